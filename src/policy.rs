//! Policies: which applications and subjects they cover, and which rules must all
//! allow. [`Catalog`] holds the compiled rules and policies, indexed by application
//! so a decision never scans every policy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::context::RequestContext;
use crate::rule::{check_id, FieldError, Rule};

/// A policy as written by an admin, and as read back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applications: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<Subjects>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<String>>,
}

/// Who a policy is for; empty means everyone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Subjects {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub id: String,
    pub spec: PolicySpec,
    pub source: String,
    pub version: i64,
    /// RFC 3339; set by the registry.
    pub created_at: String,
    /// RFC 3339; set by the registry.
    pub updated_at: String,
    pub enabled: bool,
    pub applications: Vec<String>,
    users: HashSet<String>,
    groups: HashSet<String>,
    pub rules: Vec<String>,
}

impl Policy {
    /// Validates a spec on its own (rule references are checked by [`Catalog::build`]).
    pub fn compile(mut spec: PolicySpec, source: &str, version: i64) -> Result<Policy, Vec<FieldError>> {
        let mut errors = Vec::new();
        let id = spec.id.clone().unwrap_or_default();
        check_id(&id, &mut errors);
        let applications = spec.applications.clone().unwrap_or_default();
        if spec.applications.is_none() {
            errors.push(FieldError::new(
                "applications",
                "`applications` is required (a list of application names, or `[\"*\"]`)",
            ));
        } else if applications.is_empty() {
            errors.push(FieldError::new("applications", "list at least one application, or `\"*\"` for all"));
        }
        for (i, app) in applications.iter().enumerate() {
            if app.trim().is_empty() {
                errors.push(FieldError::new(format!("applications[{i}]"), "an application name cannot be empty"));
            }
        }
        let rules = spec.rules.clone().unwrap_or_default();
        if spec.rules.is_none() {
            errors.push(FieldError::new("rules", "`rules` is required (the ids of the rules that must all allow)"));
        }
        let mut seen = HashSet::new();
        for (i, r) in rules.iter().enumerate() {
            if !seen.insert(r) {
                errors.push(FieldError::new(format!("rules[{i}]"), format!("rule `{r}` is listed twice")));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let subjects = spec.subjects.clone().unwrap_or_default();
        spec.name = Some(spec.name.clone().unwrap_or_else(|| id.clone()));
        spec.enabled = Some(spec.enabled.unwrap_or(true));
        spec.subjects = Some(subjects.clone());
        Ok(Policy {
            id,
            enabled: spec.enabled.unwrap_or(true),
            applications,
            users: subjects.users.into_iter().collect(),
            groups: subjects.groups.into_iter().collect(),
            rules,
            source: source.to_owned(),
            version,
            created_at: String::new(),
            updated_at: String::new(),
            spec,
        })
    }

    /// The policy as reads show it, with the read-only fields.
    pub fn to_json(&self) -> serde_json::Value {
        crate::rule::with_meta(&self.spec, &self.source, self.version, &self.created_at, &self.updated_at)
    }

    /// Whether the policy's subjects cover the request (empty subjects cover everyone).
    /// Users match exactly; groups match a group id or a group name.
    pub fn covers(&self, ctx: &RequestContext) -> bool {
        if self.users.is_empty() && self.groups.is_empty() {
            return true;
        }
        if ctx.username.as_ref().is_some_and(|u| self.users.contains(u)) {
            return true;
        }
        let in_group = |list: &Option<Vec<String>>| list.iter().flatten().any(|g| self.groups.contains(g));
        in_group(&ctx.groups) || in_group(&ctx.group_names)
    }
}

/// The rules and policies in force, indexed for decisions. Immutable: a change builds
/// a new catalog and swaps it in.
#[derive(Debug, Default)]
pub struct Catalog {
    pub rules: BTreeMap<String, Arc<Rule>>,
    pub policies: BTreeMap<String, Arc<Policy>>,
    by_application: HashMap<String, Vec<Arc<Policy>>>,
    every_application: Vec<Arc<Policy>>,
}

impl Catalog {
    /// Builds a catalog, checking that every policy's rules exist.
    pub fn build(rules: Vec<Arc<Rule>>, policies: Vec<Arc<Policy>>) -> Result<Catalog, Vec<(String, FieldError)>> {
        let rules: BTreeMap<String, Arc<Rule>> = rules.into_iter().map(|r| (r.id.clone(), r)).collect();
        let mut errors = Vec::new();
        for p in &policies {
            for (i, r) in p.rules.iter().enumerate() {
                if !rules.contains_key(r) {
                    errors.push((
                        p.id.clone(),
                        FieldError::new(format!("rules[{i}]"), format!("rule `{r}` does not exist")),
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut by_application: HashMap<String, Vec<Arc<Policy>>> = HashMap::new();
        let mut every_application = Vec::new();
        for p in &policies {
            if !p.enabled {
                continue;
            }
            for app in &p.applications {
                if app == "*" {
                    every_application.push(p.clone());
                } else {
                    by_application.entry(app.clone()).or_default().push(p.clone());
                }
            }
        }
        Ok(Catalog {
            rules,
            policies: policies.into_iter().map(|p| (p.id.clone(), p)).collect(),
            by_application,
            every_application,
        })
    }

    /// The enabled policies that match a request, in id order, each once.
    pub fn matching(&self, ctx: &RequestContext) -> Vec<Arc<Policy>> {
        let mut out: Vec<Arc<Policy>> = self
            .by_application
            .get(&ctx.application)
            .into_iter()
            .flatten()
            .chain(self.every_application.iter())
            .filter(|p| p.covers(ctx))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.dedup_by(|a, b| a.id == b.id);
        out
    }

    /// The policies that list a rule.
    pub fn policies_using(&self, rule_id: &str) -> Vec<String> {
        self.policies.values().filter(|p| p.rules.iter().any(|r| r == rule_id)).map(|p| p.id.clone()).collect()
    }
}
