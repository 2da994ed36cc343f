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
        let constraints = match query {
            None => Vec::new(),
            Some(q) => {
                let pairs = crate::policy::decode_query(Some(q));
                // A narrowing that cannot be read grants nothing: dropping the part that cannot
                // be read would widen the scope.
                if pairs.is_empty() || pairs.iter().any(|(k, v)| k.is_empty() || v.is_empty()) {
                    return None;
                }
                pairs
            }
        };
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

pub use tributary_core::matches_token;

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

    #[test]
    fn a_narrowing_that_cannot_be_read_grants_nothing() {
        for scope in [
            "patient/Observation.rs?category",
            "patient/Observation.rs?",
            "patient/Observation.rs?=laboratory",
            "patient/Observation.rs?category=",
            "patient/Observation.rs?category=laboratory&status",
        ] {
            let s = ScopeSet::parse(scope);
            assert!(s.is_empty(), "{scope} parsed as {s:?}");
            assert_eq!(s.grant(Perm::Read, "Observation", true), Grant::Denied);
        }
        let encoded = ScopeSet::parse(
            "user/Observation.rs?category=http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fobservation-category%7Claboratory",
        );
        assert_eq!(
            encoded.scopes[0].constraints,
            [(
                "category".to_string(),
                "http://terminology.hl7.org/CodeSystem/observation-category|laboratory".to_string()
            )]
        );
    }

    use proptest::prelude::*;

    /// A scope string built from its parts, with what it should grant.
    #[derive(Debug, Clone)]
    struct Model {
        text: String,
        context: ScopeContext,
        rtype: Option<&'static str>,
        perms: Vec<Perm>,
    }

    const ALL: [Perm; 5] = [
        Perm::Create,
        Perm::Read,
        Perm::Update,
        Perm::Delete,
        Perm::Search,
    ];

    fn model() -> impl Strategy<Value = Model> {
        let context = prop_oneof![
            Just(("patient", ScopeContext::Patient)),
            Just(("user", ScopeContext::User)),
            Just(("system", ScopeContext::System)),
        ];
        let rtype = prop_oneof![Just(None), Just(Some("Patient")), Just(Some("Observation"))];
        // v1 words, or a non-empty subset of the v2 letters in `cruds` order
        let perms = prop_oneof![
            Just(("read".to_string(), vec![Perm::Read, Perm::Search])),
            Just((
                "write".to_string(),
                vec![Perm::Create, Perm::Update, Perm::Delete]
            )),
            Just(("*".to_string(), ALL.to_vec())),
            proptest::sample::subsequence(ALL.to_vec(), 1..=5)
                .prop_map(|p| (p.iter().map(|x| x.letter()).collect(), p)),
        ];
        (context, rtype, perms).prop_map(|((ctx, context), rtype, (word, perms))| Model {
            text: format!("{ctx}/{}.{word}", rtype.unwrap_or("*")),
            context,
            rtype,
            perms,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever a token's scope claim holds, parsing never panics.
        #[test]
        fn any_scope_text_parses_without_panic(text in any::<String>()) {
            let s = ScopeSet::parse(&text);
            for p in ALL {
                let _ = s.grant(p, "Observation", true);
            }
        }

        /// A set of well-formed scopes grants a (permission, type) exactly when one of them names
        /// it, `patient/` scopes only with a patient context, and the grant is compartment-only
        /// exactly when every granting scope is a `patient/` one.
        #[test]
        fn grants_follow_the_scopes_named(
            models in proptest::collection::vec(model(), 1..4),
            // words that are not clinical scopes (`openid`, `launch`, …: no `/`)
            noise in proptest::collection::vec("[a-z.*?=_]{1,12}", 0..3),
            has_patient in any::<bool>(),
        ) {
            let text = models
                .iter()
                .map(|m| m.text.clone())
                .chain(noise)
                .collect::<Vec<_>>()
                .join(" ");
            let set = ScopeSet::parse(&text);
            prop_assert_eq!(set.scopes.len(), models.len());
            for rtype in ["Patient", "Observation", "Encounter"] {
                for perm in ALL {
                    let granting: Vec<&Model> = models
                        .iter()
                        .filter(|m| m.perms.contains(&perm) && m.rtype.is_none_or(|t| t == rtype))
                        .filter(|m| m.context != ScopeContext::Patient || has_patient)
                        .collect();
                    let got = set.grant(perm, rtype, has_patient);
                    if granting.is_empty() {
                        prop_assert_eq!(got, Grant::Denied, "{} {:?} {}", text, perm, rtype);
                        continue;
                    }
                    let patient_only = granting.iter().all(|m| m.context == ScopeContext::Patient);
                    prop_assert_eq!(
                        got,
                        Grant::Granted { patient_only, narrowing: vec![] },
                        "{} {:?} {}", text, perm, rtype
                    );
                }
            }
        }
    }
}
