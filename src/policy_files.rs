//! Policy files: `policies/*.json`, each `{"rules": [...], "policies": [...]}`.
//! Loading is all-or-nothing per file; every problem is reported as
//! `file: path.to.field: message`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::policy::{Policy, PolicySpec};
use crate::rule::{Rule, RuleSpec};

/// A policy file's content.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    #[serde(default)]
    rules: Vec<serde_json::Value>,
    #[serde(default)]
    policies: Vec<serde_json::Value>,
}

/// A file that loaded: its compiled objects.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    /// The file name, e.g. `access.json`.
    pub name: String,
    /// `policies/access.json`, as objects show it in `source`.
    pub source: String,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
    pub rules: Vec<Arc<Rule>>,
    pub policies: Vec<Arc<Policy>>,
}

/// One problem in a file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileProblem {
    pub file: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.field, self.message)
    }
}

/// The `*.json` files of a directory, sorted by name.
pub fn files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Loads one file on its own (rule references are checked across files later).
pub fn load_file(path: &Path) -> Result<LoadedFile, Vec<FileProblem>> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let display = path.display().to_string();
    let problem =
        |field: &str, message: String| FileProblem { file: display.clone(), field: field.to_owned(), message };
    let bytes = std::fs::read(path).map_err(|e| vec![problem("-", format!("cannot read: {e}"))])?;
    let body: FileBody =
        serde_json::from_slice(&bytes).map_err(|e| vec![problem("-", format!("not a policy file: {e}"))])?;
    let source = format!("policies/{name}");
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map(|t| crate::store::format_time(time::OffsetDateTime::from(t)))
        .unwrap_or_else(|_| crate::store::now_string());
    let mut problems = Vec::new();
    let mut rules = Vec::new();
    for (i, raw) in body.rules.into_iter().enumerate() {
        let field = format!("rules[{i}]");
        match serde_path_to_error::deserialize::<_, RuleSpec>(raw) {
            Ok(mut spec) => match resolve_env_secrets(&mut spec).and_then(|()| Rule::compile(spec, &source, 1)) {
                Ok(mut rule) => {
                    rule.created_at.clone_from(&modified);
                    rule.updated_at.clone_from(&modified);
                    rules.push(Arc::new(rule))
                }
                Err(errors) => {
                    problems.extend(errors.into_iter().map(|e| problem(&format!("{field}.{}", e.field), e.message)))
                }
            },
            Err(e) => problems.push(problem(&format!("{field}.{}", e.path()), e.inner().to_string())),
        }
    }
    let mut policies = Vec::new();
    for (i, raw) in body.policies.into_iter().enumerate() {
        let field = format!("policies[{i}]");
        match serde_path_to_error::deserialize::<_, PolicySpec>(raw) {
            Ok(spec) => match Policy::compile(spec, &source, 1) {
                Ok(mut p) => {
                    p.created_at.clone_from(&modified);
                    p.updated_at.clone_from(&modified);
                    policies.push(Arc::new(p))
                }
                Err(errors) => {
                    problems.extend(errors.into_iter().map(|e| problem(&format!("{field}.{}", e.field), e.message)))
                }
            },
            Err(e) => problems.push(problem(&format!("{field}.{}", e.path()), e.inner().to_string())),
        }
    }
    duplicates(rules.iter().map(|r| r.id.as_str()), "rules", &display, &mut problems);
    duplicates(policies.iter().map(|p| p.id.as_str()), "policies", &display, &mut problems);
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(LoadedFile { name, source, sha256: hex::encode(Sha256::digest(&bytes)), rules, policies })
}

/// The prefix of a secret that names an environment variable instead of holding the
/// value: `"password": "$env:POSTURE_PASSWORD"` keeps the secret out of the file.
pub const ENV_SECRET_PREFIX: &str = "$env:";

/// Replaces each `$env:NAME` secret of a rule's auth with the variable's value. A
/// variable that is unset or empty is a problem naming the field and the variable
/// (never a value).
fn resolve_env_secrets(spec: &mut RuleSpec) -> Result<(), Vec<crate::rule::FieldError>> {
    let Some(auth) = spec.auth.as_mut() else { return Ok(()) };
    let mut errors = Vec::new();
    for path in ["auth.password", "auth.value", "auth.client_secret"] {
        let Some(slot) = auth.secret_mut(path) else { continue };
        let Some(var) = slot.as_ref().and_then(|s| s.expose().strip_prefix(ENV_SECRET_PREFIX)).map(str::to_owned)
        else {
            continue;
        };
        match std::env::var(&var) {
            Ok(value) if !value.is_empty() => *slot = Some(crate::secret::Secret::new(value)),
            _ => errors.push(crate::rule::FieldError::new(
                path,
                format!("environment variable `{var}` (named by `{ENV_SECRET_PREFIX}{var}`) is not set or empty"),
            )),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn duplicates<'a>(ids: impl Iterator<Item = &'a str>, what: &str, file: &str, problems: &mut Vec<FileProblem>) {
    let mut seen = BTreeMap::new();
    for (i, id) in ids.enumerate() {
        if let Some(first) = seen.insert(id, i) {
            problems.push(FileProblem {
                file: file.into(),
                field: format!("{what}[{i}].id"),
                message: format!("`{id}` is already defined at {what}[{first}]"),
            });
        }
    }
}

/// Loads every file, then checks ids are unique across files and every policy's
/// rules exist among `extra_rules` (rules from the store) and the files' rules.
/// Files that fail are reported; files that load are returned.
pub fn load_all(paths: &[PathBuf], extra_rules: &[String]) -> (Vec<LoadedFile>, Vec<FileProblem>) {
    let mut loaded = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        match load_file(path) {
            Ok(f) => loaded.push(f),
            Err(p) => problems.extend(p),
        }
    }
    let mut rule_owner: BTreeMap<String, String> =
        extra_rules.iter().map(|r| (r.clone(), "the API".to_owned())).collect();
    let mut policy_owner: BTreeMap<String, String> = BTreeMap::new();
    for f in &loaded {
        for (i, r) in f.rules.iter().enumerate() {
            if let Some(other) = rule_owner.insert(r.id.clone(), f.source.clone()) {
                problems.push(FileProblem {
                    file: f.source.clone(),
                    field: format!("rules[{i}].id"),
                    message: format!("rule `{}` is also defined in {other}", r.id),
                });
            }
        }
        for (i, p) in f.policies.iter().enumerate() {
            if let Some(other) = policy_owner.insert(p.id.clone(), f.source.clone()) {
                problems.push(FileProblem {
                    file: f.source.clone(),
                    field: format!("policies[{i}].id"),
                    message: format!("policy `{}` is also defined in {other}", p.id),
                });
            }
        }
    }
    for f in &loaded {
        for (i, p) in f.policies.iter().enumerate() {
            for (j, r) in p.rules.iter().enumerate() {
                if !rule_owner.contains_key(r) {
                    problems.push(FileProblem {
                        file: f.source.clone(),
                        field: format!("policies[{i}].rules[{j}]"),
                        message: format!("rule `{r}` does not exist"),
                    });
                }
            }
        }
    }
    (loaded, problems)
}

/// `verdict validate`: the files named, directories expanded to their `*.json`.
pub fn validate(paths: &[PathBuf]) -> Vec<FileProblem> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for p in paths {
        if p.is_dir() {
            match files_in(p) {
                Ok(mut f) => files.append(&mut f),
                Err(e) => problems.push(FileProblem {
                    file: p.display().to_string(),
                    field: "-".into(),
                    message: format!("cannot read directory: {e}"),
                }),
            }
        } else {
            files.push(p.clone());
        }
    }
    let (_, mut more) = load_all(&files, &[]);
    problems.append(&mut more);
    problems
}
