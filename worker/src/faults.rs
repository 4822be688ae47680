//! Faults injected on purpose, for the tests of how the coordinator recovers from each kind of
//! step failure (in the spirit of etcd's failpoints). Off unless `CARAVAN_INJECT_FAULT` is set;
//! each fault fires once per process.
//!
//! `CARAVAN_INJECT_FAULT=KIND@STEP[/rankR][/MSms]`, with KIND one of:
//! - `reject`: refuse step STEP as an invalid batch, before touching any state;
//! - `diverge`: answer step STEP with a different token than the model sampled;
//! - `stall`: answer step STEP only after MS milliseconds (after its collectives);
//! - `panic`: panic in the middle of step STEP (after its collectives, before sampling), as a bug
//!   in the model code would; the process stays up.
//!
//! With `/rankR` only rank R fires (local workers inherit the coordinator's environment, so
//! without it every rank does). STEP counts a group's steps from 0 (the warm-up).

use std::{sync::atomic::AtomicBool, time::Duration};

/// What to do wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Reject,
    Diverge,
    Stall(Duration),
    Panic,
}

/// A fault armed for one step.
#[derive(Debug)]
pub struct Fault {
    pub kind: FaultKind,
    pub step: u64,
    pub rank: Option<u32>,
    fired: AtomicBool,
}

impl Fault {
    /// The fault `CARAVAN_INJECT_FAULT` asks for, if any.
    pub fn from_env() -> Result<Option<Fault>, String> {
        match std::env::var("CARAVAN_INJECT_FAULT") {
            Ok(spec) if !spec.is_empty() => Fault::parse(&spec).map(Some),
            _ => Ok(None),
        }
    }

    pub fn parse(spec: &str) -> Result<Fault, String> {
        let bad = || format!("CARAVAN_INJECT_FAULT {spec:?} is not KIND@STEP[/rankR][/MSms]");
        let mut parts = spec.split('/');
        let (kind, step) = parts
            .next()
            .and_then(|p| p.split_once('@'))
            .ok_or_else(bad)?;
        let step = step.parse().map_err(|_| bad())?;
        let (mut rank, mut ms) = (None, None);
        for part in parts {
            if let Some(r) = part.strip_prefix("rank") {
                rank = Some(r.parse().map_err(|_| bad())?);
            } else if let Some(m) = part.strip_suffix("ms") {
                ms = Some(m.parse().map_err(|_| bad())?);
            } else {
                return Err(bad());
            }
        }
        let kind = match (kind, ms) {
            ("reject", None) => FaultKind::Reject,
            ("diverge", None) => FaultKind::Diverge,
            ("panic", None) => FaultKind::Panic,
            ("stall", Some(ms)) => FaultKind::Stall(Duration::from_millis(ms)),
            _ => return Err(bad()),
        };
        Ok(Fault {
            kind,
            step,
            rank,
            fired: AtomicBool::new(false),
        })
    }

    /// Whether the fault fires at `step` on `rank` (true at most once).
    pub fn fires(&self, step: u64, rank: u32) -> bool {
        step == self.step
            && self.rank.is_none_or(|r| r == rank)
            && !self.fired.swap(true, std::sync::atomic::Ordering::AcqRel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_fire_once() {
        let f = Fault::parse("stall@3/rank1/1500ms").unwrap();
        assert_eq!(f.kind, FaultKind::Stall(Duration::from_millis(1500)));
        assert_eq!((f.step, f.rank), (3, Some(1)));
        assert!(!f.fires(3, 0));
        assert!(!f.fires(2, 1));
        assert!(f.fires(3, 1));
        assert!(!f.fires(3, 1), "once");
        assert_eq!(Fault::parse("reject@2").unwrap().kind, FaultKind::Reject);
        assert_eq!(Fault::parse("panic@4").unwrap().kind, FaultKind::Panic);
        for bad in [
            "reject",
            "reject@x",
            "stall@2",
            "diverge@2/10ms",
            "boom@1",
            "reject@1/r1",
        ] {
            assert!(Fault::parse(bad).is_err(), "{bad}");
        }
    }
}
