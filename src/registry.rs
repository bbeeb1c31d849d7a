//! The managed objects in force — those from policy files and those created over the
//! API — and the one place that changes them: validate, check conflicts, write the
//! store (object and audit entry in one transaction), then swap a new catalog into
//! the engine.
//!
//! Architecture Invariant: every change to rules, policies or webhooks goes through the
//! registry, under its write lock; memory changes only after the store committed, and
//! nothing is stored when validation fails.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::engine::Engine;
use crate::policy::{Catalog, Policy, PolicySpec};
use crate::policy_files::{self, FileProblem, LoadedFile};
use crate::rule::{FieldError, Rule, RuleSpec, SOURCE_API};
use crate::secret::Secret;
use crate::store::{now_string, AuditAction, AuditDraft, Change, ObjectKind, Store, StoreError, StoredObject};
use crate::webhooks::{Webhook, WebhookSpec, Webhooks};

/// Rules and policies by origin.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub files: Vec<LoadedFile>,
    pub api_rules: BTreeMap<String, Arc<Rule>>,
    pub api_policies: BTreeMap<String, Arc<Policy>>,
    /// Webhooks exist only over the API (SPEC §10).
    pub webhooks: BTreeMap<String, Arc<Webhook>>,
}

impl Objects {
    /// Builds the catalog of everything.
    pub fn catalog(&self) -> Result<Catalog, Vec<(String, FieldError)>> {
        let rules =
            self.files.iter().flat_map(|f| f.rules.iter().cloned()).chain(self.api_rules.values().cloned()).collect();
        let policies = self
            .files
            .iter()
            .flat_map(|f| f.policies.iter().cloned())
            .chain(self.api_policies.values().cloned())
            .collect();
        Catalog::build(rules, policies)
    }

    fn file_rule(&self, id: &str) -> Option<&Arc<Rule>> {
        self.files.iter().flat_map(|f| f.rules.iter()).find(|r| r.id == id)
    }

    fn file_policy(&self, id: &str) -> Option<&Arc<Policy>> {
        self.files.iter().flat_map(|f| f.policies.iter()).find(|p| p.id == id)
    }
}

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} `{1}` does not exist")]
    NotFound(&'static str, String),
    #[error("{0}")]
    Conflict(String),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// Owner of the object set; serializes writers.
pub struct Registry {
    objects: Mutex<Objects>,
    engine: Arc<Engine>,
    webhooks: Arc<Webhooks>,
    store: Arc<dyn Store>,
    policies_dir: PathBuf,
    files_loaded: std::sync::atomic::AtomicBool,
    /// Background tasks failing the pending deliveries of deleted webhooks, by id: a
    /// webhook created again with that id waits for its task, so its own first events
    /// are never failed by the old one's cleanup.
    webhook_cleanups: std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl Registry {
    /// A registry over an engine and a store.
    pub fn new(engine: Arc<Engine>, webhooks: Arc<Webhooks>, store: Arc<dyn Store>, policies_dir: PathBuf) -> Registry {
        Registry {
            objects: Mutex::new(Objects::default()),
            engine,
            webhooks,
            store,
            policies_dir,
            files_loaded: false.into(),
            webhook_cleanups: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The webhooks in force.
    pub fn webhooks(&self) -> &Arc<Webhooks> {
        &self.webhooks
    }

    /// Whether policy files have loaded (readiness).
    pub fn files_loaded(&self) -> bool {
        self.files_loaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The engine the registry feeds.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The store behind the registry.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Reads every API-managed object from the store and replaces the API part of
    /// the object set (at start, and when another replica's changes may have been
    /// missed). Objects that no longer compile are skipped with an error in the log.
    pub async fn load_store(&self) -> Result<(), StoreError> {
        let stored = self.store.load_all().await?;
        let mut guard = self.objects.lock().await;
        let mut next = guard.clone();
        next.api_rules.clear();
        next.api_policies.clear();
        next.webhooks.clear();
        for obj in &stored {
            put_stored(&mut next, obj);
        }
        if let Err(problems) = self.install(&mut guard, next) {
            tracing::error!(?problems, "stored objects do not form a valid catalog; keeping the running set");
        }
        Ok(())
    }

    /// Applies a change another replica made: the object as stored now, or `None`
    /// when it was deleted.
    pub async fn apply_remote(&self, kind: ObjectKind, id: &str, stored: Option<StoredObject>) {
        let mut guard = self.objects.lock().await;
        let mut next = guard.clone();
        match (&stored, kind) {
            (Some(obj), _) => put_stored(&mut next, obj),
            (None, ObjectKind::Rule) => {
                next.api_rules.remove(id);
            }
            (None, ObjectKind::Policy) => {
                next.api_policies.remove(id);
            }
            (None, ObjectKind::Webhook) => {
                next.webhooks.remove(id);
            }
        }
        match self.install(&mut guard, next) {
            Ok(()) => tracing::debug!(kind = kind.as_str(), id, "applied a change from another replica"),
            Err(problems) => tracing::error!(?problems, "a change from another replica does not build; reloading all"),
        }
    }

    fn install(&self, guard: &mut Objects, next: Objects) -> Result<(), Vec<(String, FieldError)>> {
        let catalog = next.catalog()?;
        self.engine.replace_catalog(catalog);
        self.webhooks.replace(next.webhooks.clone());
        *guard = next;
        Ok(())
    }

    /// Loads (or reloads) the policy directory. All files must load and the result must
    /// build; otherwise nothing changes and every problem is returned. Each file whose
    /// content differs from its last recorded load gets one `load` audit entry.
    pub async fn load_files(&self) -> Result<Vec<LoadedFile>, Vec<FileProblem>> {
        let dir = self.policies_dir.clone();
        let paths = match policy_files::files_in(&dir) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(vec![FileProblem {
                    file: dir.display().to_string(),
                    field: "-".into(),
                    message: format!("cannot read directory: {e}"),
                }])
            }
        };
        let mut guard = self.objects.lock().await;
        let api_rules: Vec<String> = guard.api_rules.keys().cloned().collect();
        let (files, mut problems) = policy_files::load_all(&paths, &api_rules);
        for f in &files {
            for (i, p) in f.policies.iter().enumerate() {
                if guard.api_policies.contains_key(&p.id) {
                    problems.push(FileProblem {
                        file: f.source.clone(),
                        field: format!("policies[{i}].id"),
                        message: format!("policy `{}` is also defined over the API", p.id),
                    });
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut next = guard.clone();
        next.files = files.clone();
        self.install(&mut guard, next).map_err(|errors| {
            errors
                .into_iter()
                .map(|(policy, e)| FileProblem { file: format!("policy {policy}"), field: e.field, message: e.message })
                .collect::<Vec<_>>()
        })?;
        self.files_loaded.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(guard);
        for f in &files {
            if let Err(e) = self.audit_file_load(f).await {
                tracing::error!(file = %f.source, error = %e, "could not record the policy file load in the audit log");
            }
        }
        Ok(files)
    }

    async fn audit_file_load(&self, file: &LoadedFile) -> Result<(), StoreError> {
        if self.store.last_file_hash(&file.name).await?.as_deref() == Some(file.sha256.as_str()) {
            return Ok(());
        }
        let draft = AuditDraft {
            actor: format!("file:{}", file.name),
            action: AuditAction::Load,
            object_type: "file".into(),
            object_id: file.name.clone(),
            before: None,
            after: Some(json!({
                "file": file.source,
                "sha256": file.sha256,
                "rules": file.rules.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
                "policies": file.policies.iter().map(|p| p.to_json()).collect::<Vec<_>>(),
            })),
        };
        self.store.commit(Vec::new(), vec![draft]).await.map(|_| ())
    }

    /// A snapshot of the objects (reads).
    pub async fn objects(&self) -> Objects {
        self.objects.lock().await.clone()
    }

    /// Creates a rule over the API.
    pub async fn create_rule(&self, actor: &str, mut spec: RuleSpec) -> Result<Arc<Rule>, RegistryError> {
        let mut guard = self.objects.lock().await;
        let id = spec.id.get_or_insert_with(generated_id).clone();
        if guard.api_rules.contains_key(&id) || guard.file_rule(&id).is_some() {
            return Err(RegistryError::Conflict(format!("rule `{id}` already exists")));
        }
        if let Some(auth) = spec.auth.as_mut() {
            // The mask stands for "the stored value", and a new rule has none.
            for path in ["auth.password", "auth.value", "auth.client_secret"] {
                if let Some(slot) = auth.secret_mut(path) {
                    if slot.as_ref().is_some_and(Secret::is_mask) {
                        *slot = None;
                    }
                }
            }
        }
        let now = now_string();
        let mut rule = Rule::compile(spec, SOURCE_API, 1).map_err(RegistryError::Validation)?;
        rule.created_at.clone_from(&now);
        rule.updated_at = now;
        let rule = Arc::new(rule);
        let mut next = guard.clone();
        next.api_rules.insert(id.clone(), rule.clone());
        self.commit_rule(&mut guard, next, actor, AuditAction::Create, None, Some(&rule)).await?;
        Ok(rule)
    }

    /// Replaces a rule over the API. Secrets left out or sent as the mask keep their
    /// stored values.
    pub async fn update_rule(&self, actor: &str, id: &str, mut spec: RuleSpec) -> Result<Arc<Rule>, RegistryError> {
        let mut guard = self.objects.lock().await;
        if let Some(r) = guard.file_rule(id) {
            return Err(read_only("rule", id, &r.source));
        }
        let old = guard.api_rules.get(id).cloned().ok_or_else(|| RegistryError::NotFound("rule", id.to_owned()))?;
        check_body_id(spec.id.as_deref(), id)?;
        spec.id = Some(id.to_owned());
        if let (Some(auth), Some(old_auth)) = (spec.auth.as_mut(), old.spec.auth.as_ref()) {
            for (path, stored) in old_auth.secrets() {
                if let Some(slot) = auth.secret_mut(path) {
                    if slot.as_ref().is_none_or(Secret::is_mask) {
                        *slot = Some(stored.clone());
                    }
                }
            }
        }
        let mut rule = Rule::compile(spec, SOURCE_API, old.version + 1).map_err(RegistryError::Validation)?;
        rule.created_at.clone_from(&old.created_at);
        rule.updated_at = now_string();
        let rule = Arc::new(rule);
        let mut next = guard.clone();
        next.api_rules.insert(id.to_owned(), rule.clone());
        self.commit_rule(&mut guard, next, actor, AuditAction::Update, Some(&old), Some(&rule)).await?;
        Ok(rule)
    }

    /// Deletes a rule that no policy lists.
    pub async fn delete_rule(&self, actor: &str, id: &str) -> Result<(), RegistryError> {
        let mut guard = self.objects.lock().await;
        if let Some(r) = guard.file_rule(id) {
            return Err(read_only("rule", id, &r.source));
        }
        let old = guard.api_rules.get(id).cloned().ok_or_else(|| RegistryError::NotFound("rule", id.to_owned()))?;
        let users = self.engine.catalog().policies_using(id);
        if !users.is_empty() {
            let names: Vec<String> = users.iter().map(|p| format!("`{p}`")).collect();
            return Err(RegistryError::Conflict(format!(
                "rule `{id}` is used by polic{} {}; remove it there first",
                if users.len() == 1 { "y" } else { "ies" },
                names.join(", ")
            )));
        }
        let mut next = guard.clone();
        next.api_rules.remove(id);
        self.commit_rule(&mut guard, next, actor, AuditAction::Delete, Some(&old), None).await
    }

    async fn commit_rule(
        &self,
        guard: &mut Objects,
        next: Objects,
        actor: &str,
        action: AuditAction,
        before: Option<&Rule>,
        after: Option<&Rule>,
    ) -> Result<(), RegistryError> {
        let catalog = next.catalog().map_err(|e| RegistryError::Validation(e.into_iter().map(|(_, e)| e).collect()))?;
        let id = after.or(before).map(|r| r.id.clone()).unwrap_or_default();
        let change = match after {
            Some(rule) => Change::Put(rule_to_store(rule)),
            None => Change::Delete { kind: ObjectKind::Rule, id: id.clone() },
        };
        let audit = AuditDraft {
            actor: actor.to_owned(),
            action,
            object_type: "rule".into(),
            object_id: id,
            before: before.map(Rule::to_json),
            after: after.map(Rule::to_json),
        };
        self.store.commit(vec![change], vec![audit]).await?;
        self.engine.replace_catalog(catalog);
        *guard = next;
        Ok(())
    }

    /// Creates a policy over the API.
    pub async fn create_policy(&self, actor: &str, mut spec: PolicySpec) -> Result<Arc<Policy>, RegistryError> {
        let mut guard = self.objects.lock().await;
        let id = spec.id.get_or_insert_with(generated_id).clone();
        if guard.api_policies.contains_key(&id) || guard.file_policy(&id).is_some() {
            return Err(RegistryError::Conflict(format!("policy `{id}` already exists")));
        }
        let now = now_string();
        let mut policy = Policy::compile(spec, SOURCE_API, 1).map_err(RegistryError::Validation)?;
        policy.created_at.clone_from(&now);
        policy.updated_at = now;
        let policy = Arc::new(policy);
        let mut next = guard.clone();
        next.api_policies.insert(id, policy.clone());
        self.commit_policy(&mut guard, next, actor, AuditAction::Create, None, Some(&policy)).await?;
        Ok(policy)
    }

    /// Replaces a policy over the API.
    pub async fn update_policy(
        &self,
        actor: &str,
        id: &str,
        mut spec: PolicySpec,
    ) -> Result<Arc<Policy>, RegistryError> {
        let mut guard = self.objects.lock().await;
        if let Some(p) = guard.file_policy(id) {
            return Err(read_only("policy", id, &p.source));
        }
        let old =
            guard.api_policies.get(id).cloned().ok_or_else(|| RegistryError::NotFound("policy", id.to_owned()))?;
        check_body_id(spec.id.as_deref(), id)?;
        spec.id = Some(id.to_owned());
        let mut policy = Policy::compile(spec, SOURCE_API, old.version + 1).map_err(RegistryError::Validation)?;
        policy.created_at.clone_from(&old.created_at);
        policy.updated_at = now_string();
        let policy = Arc::new(policy);
        let mut next = guard.clone();
        next.api_policies.insert(id.to_owned(), policy.clone());
        self.commit_policy(&mut guard, next, actor, AuditAction::Update, Some(&old), Some(&policy)).await?;
        Ok(policy)
    }

    /// Deletes a policy.
    pub async fn delete_policy(&self, actor: &str, id: &str) -> Result<(), RegistryError> {
        let mut guard = self.objects.lock().await;
        if let Some(p) = guard.file_policy(id) {
            return Err(read_only("policy", id, &p.source));
        }
        let old =
            guard.api_policies.get(id).cloned().ok_or_else(|| RegistryError::NotFound("policy", id.to_owned()))?;
        let mut next = guard.clone();
        next.api_policies.remove(id);
        self.commit_policy(&mut guard, next, actor, AuditAction::Delete, Some(&old), None).await
    }

    async fn commit_policy(
        &self,
        guard: &mut Objects,
        next: Objects,
        actor: &str,
        action: AuditAction,
        before: Option<&Policy>,
        after: Option<&Policy>,
    ) -> Result<(), RegistryError> {
        let catalog = next.catalog().map_err(|e| RegistryError::Validation(e.into_iter().map(|(_, e)| e).collect()))?;
        let id = after.or(before).map(|p| p.id.clone()).unwrap_or_default();
        let change = match after {
            Some(p) => Change::Put(StoredObject {
                kind: ObjectKind::Policy,
                id: p.id.clone(),
                source: p.source.clone(),
                version: p.version,
                doc: p.to_json(),
                secrets: BTreeMap::new(),
                created_at: p.created_at.clone(),
                updated_at: p.updated_at.clone(),
            }),
            None => Change::Delete { kind: ObjectKind::Policy, id: id.clone() },
        };
        let audit = AuditDraft {
            actor: actor.to_owned(),
            action,
            object_type: "policy".into(),
            object_id: id,
            before: before.map(Policy::to_json),
            after: after.map(Policy::to_json),
        };
        self.store.commit(vec![change], vec![audit]).await?;
        self.engine.replace_catalog(catalog);
        *guard = next;
        Ok(())
    }
}

impl Registry {
    /// Creates a webhook. The answer's webhook holds its signing secret (generated
    /// when not given), for the create answer to show once.
    pub async fn create_webhook(&self, actor: &str, mut spec: WebhookSpec) -> Result<Arc<Webhook>, RegistryError> {
        let mut guard = self.objects.lock().await;
        let id = spec.id.get_or_insert_with(generated_id).clone();
        if guard.webhooks.contains_key(&id) {
            return Err(RegistryError::Conflict(format!("webhook `{id}` already exists")));
        }
        // The mask stands for "the stored value", and a new webhook has none.
        for path in ["auth.password", "auth.value", "auth.client_secret", "signing_secret"] {
            if let Some(slot) = spec.secret_mut(path) {
                if slot.as_ref().is_some_and(Secret::is_mask) {
                    *slot = None;
                }
            }
        }
        let now = now_string();
        let mut hook = Webhook::compile(spec, SOURCE_API, 1).map_err(RegistryError::Validation)?;
        hook.created_at.clone_from(&now);
        hook.updated_at = now;
        let hook = Arc::new(hook);
        self.commit_webhook(&mut guard, actor, AuditAction::Create, None, Some(hook.clone())).await?;
        Ok(hook)
    }

    /// Replaces a webhook. Secrets left out or sent as the mask keep their stored values.
    pub async fn update_webhook(
        &self,
        actor: &str,
        id: &str,
        mut spec: WebhookSpec,
    ) -> Result<Arc<Webhook>, RegistryError> {
        let mut guard = self.objects.lock().await;
        let old = guard.webhooks.get(id).cloned().ok_or_else(|| RegistryError::NotFound("webhook", id.to_owned()))?;
        check_body_id(spec.id.as_deref(), id)?;
        spec.id = Some(id.to_owned());
        for (path, stored) in old.spec.secrets() {
            if let Some(slot) = spec.secret_mut(path) {
                if slot.as_ref().is_none_or(Secret::is_mask) {
                    *slot = Some(stored.clone());
                }
            }
        }
        let mut hook = Webhook::compile(spec, SOURCE_API, old.version + 1).map_err(RegistryError::Validation)?;
        hook.created_at.clone_from(&old.created_at);
        hook.updated_at = now_string();
        let hook = Arc::new(hook);
        self.commit_webhook(&mut guard, actor, AuditAction::Update, Some(old), Some(hook.clone())).await?;
        Ok(hook)
    }

    /// Deletes a webhook; its pending deliveries fail when next due.
    pub async fn delete_webhook(&self, actor: &str, id: &str) -> Result<(), RegistryError> {
        let mut guard = self.objects.lock().await;
        let old = guard.webhooks.get(id).cloned().ok_or_else(|| RegistryError::NotFound("webhook", id.to_owned()))?;
        self.commit_webhook(&mut guard, actor, AuditAction::Delete, Some(old), None).await
    }

    async fn commit_webhook(
        &self,
        guard: &mut Objects,
        actor: &str,
        action: AuditAction,
        before: Option<Arc<Webhook>>,
        after: Option<Arc<Webhook>>,
    ) -> Result<(), RegistryError> {
        let id = after.as_ref().or(before.as_ref()).map(|h| h.id.clone()).unwrap_or_default();
        let change = match &after {
            Some(h) => Change::Put(StoredObject {
                kind: ObjectKind::Webhook,
                id: h.id.clone(),
                source: h.source.clone(),
                version: h.version,
                doc: h.to_json(),
                secrets: h.spec.secrets().into_iter().map(|(k, v)| (k.to_owned(), v.expose().to_owned())).collect(),
                created_at: h.created_at.clone(),
                updated_at: h.updated_at.clone(),
            }),
            None => Change::Delete { kind: ObjectKind::Webhook, id: id.clone() },
        };
        let audit = AuditDraft {
            actor: actor.to_owned(),
            action,
            object_type: "webhook".into(),
            object_id: id.clone(),
            before: before.as_deref().map(Webhook::to_json),
            after: after.as_deref().map(Webhook::to_json),
        };
        if after.is_some() {
            let cleanup = self.webhook_cleanups.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
            if let Some(task) = cleanup {
                // Under the registry lock: nothing else writes webhooks meanwhile.
                let _ = task.await;
            }
        }
        self.store.commit(vec![change], vec![audit]).await?;
        match after {
            Some(h) => guard.webhooks.insert(id.clone(), h),
            None => guard.webhooks.remove(&id),
        };
        self.webhooks.replace(guard.webhooks.clone());
        if action == AuditAction::Delete {
            // Its pending events can no longer go anywhere (and, the set replaced, no new
            // ones are written for it). In the background, in short writes: a webhook
            // whose receiver was down for minutes has a million of them.
            let (store, hook) = (self.store.clone(), id.clone());
            let task = tokio::spawn(async move {
                let error = "the webhook was deleted";
                match crate::store::fail_pending_in_chunks(&*store, &hook, i64::MAX, i64::MAX, None, error).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(webhook = %hook, deliveries = n, "failed the deleted webhook's pending deliveries")
                    }
                    Err(e) => {
                        tracing::warn!(webhook = %hook, error = %e, "could not fail the deleted webhook's pending deliveries")
                    }
                }
            });
            let mut cleanups = self.webhook_cleanups.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            cleanups.retain(|_, t| !t.is_finished());
            cleanups.insert(id, task);
        }
        Ok(())
    }
}

/// Puts a stored object into an object set (skipping, with an error, one that does
/// not compile).
fn put_stored(next: &mut Objects, obj: &StoredObject) {
    match obj.kind {
        ObjectKind::Rule => match rule_from_store(obj) {
            Ok(rule) => {
                next.api_rules.insert(rule.id.clone(), Arc::new(rule));
            }
            Err(problems) => tracing::error!(rule = %obj.id, ?problems, "stored rule does not compile; skipped"),
        },
        ObjectKind::Policy => match policy_from_store(obj) {
            Ok(p) => {
                next.api_policies.insert(p.id.clone(), Arc::new(p));
            }
            Err(problems) => tracing::error!(policy = %obj.id, ?problems, "stored policy does not compile; skipped"),
        },
        ObjectKind::Webhook => match webhook_from_store(obj) {
            Ok(h) => {
                next.webhooks.insert(h.id.clone(), Arc::new(h));
            }
            Err(problems) => tracing::error!(webhook = %obj.id, ?problems, "stored webhook does not compile; skipped"),
        },
    }
}

fn generated_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn read_only(what: &str, id: &str, source: &str) -> RegistryError {
    RegistryError::Conflict(format!(
        "{what} `{id}` is managed by {source} and cannot be changed over the API; edit the file"
    ))
}

fn check_body_id(body_id: Option<&str>, path_id: &str) -> Result<(), RegistryError> {
    match body_id {
        Some(b) if b != path_id => Err(RegistryError::Validation(vec![FieldError::new(
            "id",
            format!("`{b}` does not match the id in the path, `{path_id}`"),
        )])),
        _ => Ok(()),
    }
}

fn rule_to_store(rule: &Rule) -> StoredObject {
    let secrets = rule
        .spec
        .auth
        .as_ref()
        .map(|a| a.secrets().into_iter().map(|(k, v)| (k.to_owned(), v.expose().to_owned())).collect())
        .unwrap_or_default();
    StoredObject {
        kind: ObjectKind::Rule,
        id: rule.id.clone(),
        source: rule.source.clone(),
        version: rule.version,
        doc: rule.to_json(),
        secrets,
        created_at: rule.created_at.clone(),
        updated_at: rule.updated_at.clone(),
    }
}

fn rule_from_store(obj: &StoredObject) -> Result<Rule, Vec<FieldError>> {
    let mut spec: RuleSpec = serde_json::from_value(strip_read_only(&obj.doc))
        .map_err(|e| vec![FieldError::new("-", format!("stored rule does not parse: {e}"))])?;
    if let Some(auth) = spec.auth.as_mut() {
        for (path, value) in &obj.secrets {
            if let Some(slot) = auth.secret_mut(path) {
                *slot = Some(Secret::new(value.clone()));
            }
        }
    }
    let mut rule = Rule::compile(spec, &obj.source, obj.version)?;
    rule.created_at.clone_from(&obj.created_at);
    rule.updated_at.clone_from(&obj.updated_at);
    Ok(rule)
}

fn webhook_from_store(obj: &StoredObject) -> Result<Webhook, Vec<FieldError>> {
    let mut spec: WebhookSpec = serde_json::from_value(strip_read_only(&obj.doc))
        .map_err(|e| vec![FieldError::new("-", format!("stored webhook does not parse: {e}"))])?;
    for (path, value) in &obj.secrets {
        if let Some(slot) = spec.secret_mut(path) {
            *slot = Some(Secret::new(value.clone()));
        }
    }
    let mut hook = Webhook::compile(spec, &obj.source, obj.version)?;
    hook.created_at.clone_from(&obj.created_at);
    hook.updated_at.clone_from(&obj.updated_at);
    Ok(hook)
}

fn policy_from_store(obj: &StoredObject) -> Result<Policy, Vec<FieldError>> {
    let spec: PolicySpec = serde_json::from_value(strip_read_only(&obj.doc))
        .map_err(|e| vec![FieldError::new("-", format!("stored policy does not parse: {e}"))])?;
    let mut p = Policy::compile(spec, &obj.source, obj.version)?;
    p.created_at.clone_from(&obj.created_at);
    p.updated_at.clone_from(&obj.updated_at);
    Ok(p)
}

/// Removes `source`, `version`, `created_at`, `updated_at` from an object's JSON.
pub fn strip_read_only(doc: &Value) -> Value {
    let mut doc = doc.clone();
    if let Value::Object(map) = &mut doc {
        for k in ["source", "version", "created_at", "updated_at"] {
            map.remove(k);
        }
    }
    doc
}
