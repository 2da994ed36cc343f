use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a journaled message is in its life.
///
/// ```text
/// received ──► mapped ──► committed ──► delivered
///    │  ▲         │           │
///    │  └─replay──┴───────────┴──── failed{reason} ◄─┘
///    └──► rejected{reason}  (kept for inspection; replay moves it back to received)
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageState {
    Received,
    Mapped,
    Committed,
    Delivered,
    /// Processing failed; `reason` names the mapping file, rule and source path where known.
    Failed {
        reason: String,
    },
    /// Refused at the door (bad framing, unknown partner); the bytes are still kept.
    Rejected {
        reason: String,
    },
}

/// The state without its reason, for indexes, filters and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum StateKind {
    Received,
    Mapped,
    Committed,
    Delivered,
    Failed,
    Rejected,
}

impl StateKind {
    pub const ALL: [StateKind; 6] = [
        StateKind::Received,
        StateKind::Mapped,
        StateKind::Committed,
        StateKind::Delivered,
        StateKind::Failed,
        StateKind::Rejected,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            StateKind::Received => "received",
            StateKind::Mapped => "mapped",
            StateKind::Committed => "committed",
            StateKind::Delivered => "delivered",
            StateKind::Failed => "failed",
            StateKind::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Failed and rejected messages wait for a human; retention never prunes them.
    pub fn needs_attention(&self) -> bool {
        matches!(self, StateKind::Failed | StateKind::Rejected)
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("illegal message state transition {from} -> {to}")]
pub struct StateError {
    pub from: StateKind,
    pub to: StateKind,
}

impl MessageState {
    pub fn kind(&self) -> StateKind {
        match self {
            MessageState::Received => StateKind::Received,
            MessageState::Mapped => StateKind::Mapped,
            MessageState::Committed => StateKind::Committed,
            MessageState::Delivered => StateKind::Delivered,
            MessageState::Failed { .. } => StateKind::Failed,
            MessageState::Rejected { .. } => StateKind::Rejected,
        }
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            MessageState::Failed { reason } | MessageState::Rejected { reason } => Some(reason),
            _ => None,
        }
    }

    /// Checks a transition against the state machine. Moving back to `Received` is a replay and
    /// is allowed from every state, so a fixed mapping can re-run any message.
    pub fn check_transition(&self, to: &MessageState) -> Result<(), StateError> {
        use StateKind::*;
        let (from_k, to_k) = (self.kind(), to.kind());
        let ok = matches!(
            (from_k, to_k),
            (_, Received)
                | (Received, Mapped | Committed | Failed)
                | (Mapped, Committed | Failed)
                | (Committed, Delivered | Failed)
                | (Delivered, Delivered)
        );
        if ok {
            Ok(())
        } else {
            Err(StateError {
                from: from_k,
                to: to_k,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_path_and_failures_are_legal() {
        let s = MessageState::Received;
        assert!(s.check_transition(&MessageState::Mapped).is_ok());
        assert!(MessageState::Mapped
            .check_transition(&MessageState::Committed)
            .is_ok());
        assert!(MessageState::Committed
            .check_transition(&MessageState::Delivered)
            .is_ok());
        let failed = MessageState::Failed { reason: "x".into() };
        assert!(s.check_transition(&failed).is_ok());
        assert!(failed.check_transition(&MessageState::Received).is_ok());
    }

    #[test]
    fn skipping_or_leaving_terminal_states_is_refused() {
        let err = MessageState::Delivered
            .check_transition(&MessageState::Mapped)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal message state transition delivered -> mapped"
        );
        let rejected = MessageState::Rejected {
            reason: "bad frame".into(),
        };
        assert!(rejected.check_transition(&MessageState::Committed).is_err());
        assert!(MessageState::Received
            .check_transition(&MessageState::Delivered)
            .is_err());
    }
}
