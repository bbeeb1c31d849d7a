//! The managed objects in force — those from policy files and those created over the
//! API — and the one place that rebuilds the engine's catalog from them.
//!
//! Architecture Invariant: every change to rules or policies goes through the
//! registry, under its write lock, and ends with a new catalog swapped into the
//! engine; the decision path only ever reads the swapped-in snapshot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::engine::Engine;
use crate::policy::{Catalog, Policy};
use crate::policy_files::{self, FileProblem, LoadedFile};
use crate::rule::Rule;

/// Rules and policies by origin.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub files: Vec<LoadedFile>,
    pub api_rules: BTreeMap<String, Arc<Rule>>,
    pub api_policies: BTreeMap<String, Arc<Policy>>,
}

impl Objects {
    /// Builds the catalog of everything.
    pub fn catalog(&self) -> Result<Catalog, Vec<(String, crate::rule::FieldError)>> {
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
}

/// Owner of the object set; serializes writers.
pub struct Registry {
    objects: Mutex<Objects>,
    engine: Arc<Engine>,
    policies_dir: PathBuf,
    files_loaded: std::sync::atomic::AtomicBool,
}

impl Registry {
    /// A registry over an engine.
    pub fn new(engine: Arc<Engine>, policies_dir: PathBuf) -> Registry {
        Registry { objects: Mutex::new(Objects::default()), engine, policies_dir, files_loaded: false.into() }
    }

    /// Whether policy files have loaded (readiness).
    pub fn files_loaded(&self) -> bool {
        self.files_loaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The engine the registry feeds.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Locks the object set for a change; [`Registry::install`] finishes it.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, Objects> {
        self.objects.lock().await
    }

    /// Swaps in a new object set after its catalog builds.
    pub fn install(&self, guard: &mut Objects, next: Objects) -> Result<(), Vec<(String, crate::rule::FieldError)>> {
        let catalog = next.catalog()?;
        self.engine.replace_catalog(catalog);
        *guard = next;
        Ok(())
    }

    /// Loads (or reloads) the policy directory. All files must load and the result must
    /// build; otherwise nothing changes and every problem is returned.
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
        let (files, problems) = policy_files::load_all(&paths, &api_rules);
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut next = guard.clone();
        next.files = files.clone();
        for f in &files {
            for p in &f.policies {
                if next.api_policies.contains_key(&p.id) {
                    return Err(vec![FileProblem {
                        file: f.source.clone(),
                        field: "policies".into(),
                        message: format!("policy `{}` is also defined over the API", p.id),
                    }]);
                }
            }
        }
        self.install(&mut guard, next).map_err(|errors| {
            errors
                .into_iter()
                .map(|(policy, e)| FileProblem { file: format!("policy {policy}"), field: e.field, message: e.message })
                .collect::<Vec<_>>()
        })?;
        self.files_loaded.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(files)
    }
}
