//! SMART App Launch scopes, v1 (`patient/Observation.read`, `user/*.write`, `system/Patient.*`) and
//! v2 (`patient/Observation.rs`, `user/*.cruds`, `patient/Observation.rs?category=laboratory`).
//!
//! A [`ScopeSet`] answers one question: for this permission on this resource type, is access
//! granted, and under which restrictions (patient compartment only; search-parameter narrowing)?

use serde_json::Value;

/// Who the scope speaks for: a patient (narrowed to the token's `patient`), a user, or a system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeContext {
    Patient,
    User,
    System,
}

/// One FHIR permission letter of SMART v2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Perm {
    fn bit(self) -> u8 {
        match self {
            Perm::Create => 1,
            Perm::Read => 2,
            Perm::Update => 4,
            Perm::Delete => 8,
            Perm::Search => 16,
        }
    }

    pub fn letter(self) -> char {
        match self {
            Perm::Create => 'c',
            Perm::Read => 'r',
            Perm::Update => 'u',
            Perm::Delete => 'd',
            Perm::Search => 's',
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub context: ScopeContext,
    /// `None` for `*`.
    pub resource_type: Option<String>,
    perms: u8,
    /// v2 narrowing: every (param, value) must match the resource.
    pub constraints: Vec<(String, String)>,
}

impl Scope {
    /// Parses one clinical scope; `None` for anything else (`openid`, `launch/patient`, typos).
    pub fn parse(s: &str) -> Option<Scope> {
        let (ctx, rest) = s.split_once('/')?;
        let context = match ctx {
            "patient" => ScopeContext::Patient,
            "user" => ScopeContext::User,
            "system" => ScopeContext::System,
            _ => return None,
        };
        let (body, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (rtype, perm_text) = body.split_once('.')?;
        if rtype.is_empty() || !(rtype == "*" || rtype.chars().all(|c| c.is_ascii_alphabetic())) {
            return None;
        }
        let perms = match perm_text {
            "read" => Perm::Read.bit() | Perm::Search.bit(),
            "write" => Perm::Create.bit() | Perm::Update.bit() | Perm::Delete.bit(),
            "*" => 31,
            v2 => {
                // v2 letters must appear in cruds order, each at most once.
                let mut bits = 0u8;
                let mut last = -1i32;
                for ch in v2.chars() {
                    let pos = "cruds".find(ch)? as i32;
                    if pos <= last {
                        return None;
                    }
                    last = pos;
                    bits |= [1, 2, 4, 8, 16][pos as usize];
                }
                if bits == 0 {
                    return None;
                }
                bits
            }
        };
        let constraints = query
            .map(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        Some(Scope {
            context,
            resource_type: (rtype != "*").then(|| rtype.to_string()),
            perms,
            constraints,
        })
    }

    pub fn grants(&self, perm: Perm, rtype: &str) -> bool {
        self.perms & perm.bit() != 0 && self.resource_type.as_deref().is_none_or(|t| t == rtype)
    }
}

/// What a scope set grants for one (permission, type).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    Denied,
    /// Granted. `patient_only`: every granting scope is `patient/`, so access is narrowed to the
    /// token's patient compartment. `narrowing`: alternatives of v2 search-parameter constraints
    /// (empty = none); a resource must satisfy at least one alternative.
    Granted {
        patient_only: bool,
        narrowing: Vec<Vec<(String, String)>>,
    },
}

impl Grant {
    pub fn is_granted(&self) -> bool {
        matches!(self, Grant::Granted { .. })
    }

    /// Does the resource satisfy the v2 narrowing (if any)?
    pub fn admits(&self, resource: &Value) -> bool {
        match self {
            Grant::Denied => false,
            Grant::Granted { narrowing, .. } => {
                narrowing.is_empty()
                    || narrowing
                        .iter()
                        .any(|alt| alt.iter().all(|(k, v)| matches_token(resource, k, v)))
            }
        }
    }
}

/// A resource field matched as a token: `system|code`, `code`, or a plain string value.
pub fn matches_token(resource: &Value, field: &str, wanted: &str) -> bool {
    let (system, code) = match wanted.split_once('|') {
        Some((s, c)) => (Some(s), c),
        None => (None, wanted),
    };
    let Some(v) = resource.get(field) else {
        return false;
    };
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    items.into_iter().any(|item| match item {
        Value::String(s) => s == code,
        Value::Object(_) => {
            let codings: Vec<&Value> = match item.get("coding") {
                Some(Value::Array(c)) => c.iter().collect(),
                _ => vec![item],
            };
            codings.into_iter().any(|c| {
                c.get("code").and_then(Value::as_str) == Some(code)
                    && system.is_none_or(|s| {
                        s.is_empty() || c.get("system").and_then(Value::as_str) == Some(s)
                    })
            })
        }
        _ => false,
    })
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScopeSet {
    pub scopes: Vec<Scope>,
}

impl ScopeSet {
    pub fn parse(text: &str) -> ScopeSet {
        ScopeSet {
            scopes: text.split_whitespace().filter_map(Scope::parse).collect(),
        }
    }

    /// `has_patient`: the token carries a patient context; `patient/` scopes are void without one.
    pub fn grant(&self, perm: Perm, rtype: &str, has_patient: bool) -> Grant {
        let granting: Vec<&Scope> = self
            .scopes
            .iter()
            .filter(|s| s.grants(perm, rtype))
            .filter(|s| s.context != ScopeContext::Patient || has_patient)
            .collect();
        if granting.is_empty() {
            return Grant::Denied;
        }
        let patient_only = granting.iter().all(|s| s.context == ScopeContext::Patient);
        // Prefer the least restrictive alternatives: a non-patient scope beats patient ones.
        let relevant: Vec<&&Scope> = if patient_only {
            granting.iter().collect()
        } else {
            granting
                .iter()
                .filter(|s| s.context != ScopeContext::Patient)
                .collect()
        };
        let narrowing = if relevant.iter().any(|s| s.constraints.is_empty()) {
            Vec::new()
        } else {
            relevant.iter().map(|s| s.constraints.clone()).collect()
        };
        Grant::Granted {
            patient_only,
            narrowing,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v1_scopes() {
        let s = ScopeSet::parse("openid launch/patient patient/Observation.read user/*.write");
        assert_eq!(s.scopes.len(), 2);
        assert!(s.grant(Perm::Read, "Observation", true).is_granted());
        assert!(s.grant(Perm::Search, "Observation", true).is_granted());
        assert!(!s.grant(Perm::Read, "Observation", false).is_granted());
        assert!(!s.grant(Perm::Read, "Patient", true).is_granted());
        assert!(s.grant(Perm::Create, "Patient", false).is_granted());
        assert!(!s.grant(Perm::Read, "Patient", false).is_granted());
    }

    #[test]
    fn v2_scopes_and_order() {
        let s = ScopeSet::parse("system/Patient.cruds user/*.rs");
        assert!(s.grant(Perm::Delete, "Patient", false).is_granted());
        assert!(!s.grant(Perm::Delete, "Observation", false).is_granted());
        assert!(s.grant(Perm::Search, "Observation", false).is_granted());
        assert!(Scope::parse("user/*.sr").is_none());
        assert!(Scope::parse("user/*.rr").is_none());
        assert!(Scope::parse("user/*.x").is_none());
        assert!(Scope::parse("admin/*.rs").is_none());
    }

    #[test]
    fn patient_scopes_narrow() {
        let s = ScopeSet::parse("patient/*.rs");
        assert_eq!(
            s.grant(Perm::Read, "Observation", true),
            Grant::Granted {
                patient_only: true,
                narrowing: vec![]
            }
        );
        let s = ScopeSet::parse("patient/*.rs user/Observation.rs");
        assert!(matches!(
            s.grant(Perm::Read, "Observation", true),
            Grant::Granted {
                patient_only: false,
                ..
            }
        ));
    }

    #[test]
    fn v2_category_narrowing() {
        let s = ScopeSet::parse("patient/Observation.rs?category=laboratory");
        let g = s.grant(Perm::Search, "Observation", true);
        let lab = json!({"category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}]});
        let vital = json!({"category":[{"coding":[{"code":"vital-signs"}]}]});
        assert!(g.admits(&lab));
        assert!(!g.admits(&vital));
        assert!(!g.admits(&json!({})));
        let both = ScopeSet::parse(
            "patient/Observation.rs?category=laboratory patient/Observation.rs?category=vital-signs",
        );
        assert!(both.grant(Perm::Read, "Observation", true).admits(&vital));
    }
}
