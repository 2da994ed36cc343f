//! What an HTTP handler outside the facade tells the facade's audit layer about the patients
//! whose data it returned.
//!
//! The facade's own handlers fill the request's audit draft directly. Operations served by other
//! components behind the facade's policy stack (a Subscription's `$events`) cannot see that
//! draft, so they put a [`PatientsDisclosed`] into the response's extensions; the audit layer
//! takes it out and writes a disclosure record for each patient the request's own record does
//! not name. Ids only: pseudonymous resource ids, never an identifier value.

use std::collections::BTreeMap;

/// Patient id → how many of that patient's resources (or events) the response handed out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatientsDisclosed(pub BTreeMap<String, usize>);

impl PatientsDisclosed {
    pub fn add(&mut self, patient: &str, n: usize) {
        *self.0.entry(patient.to_string()).or_default() += n;
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
