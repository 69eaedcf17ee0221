//! Property tests of the state machine: random event sequences applied to a fleet of
//! records keep every invariant of DESIGN §3.

use std::collections::HashMap;

use lablink_core::state::transition;
use lablink_core::testing::{store::t0, strategies};
use lablink_core::{Email, Hostname, VmEvent, VmRecord, VmState};
use proptest::prelude::*;

fn fleet(n: usize) -> Vec<VmRecord> {
    (0..n)
        .map(|i| VmRecord::new(format!("vm-{i}").parse::<Hostname>().unwrap(), None, t0()))
        .collect()
}

/// What a store does on `Claim` besides the transition: refuse an email that owns a VM.
fn email_free(fleet: &[VmRecord], event: &VmEvent) -> bool {
    match event {
        VmEvent::Claim(a) => !fleet.iter().any(|r| r.owner() == Some(&a.email)),
        _ => true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_event_sequences_keep_every_invariant(
        steps in prop::collection::vec((0..6usize, strategies::vm_event()), 1..200)
    ) {
        let mut fleet = fleet(6);
        for (i, event) in steps {
            let before = fleet[i].clone();
            let legal = transition(&before.state, &event).is_ok() && email_free(&fleet, &event);
            if !email_free(&fleet, &event) {
                continue;
            }
            let result = fleet[i].apply(&event, t0());
            match result {
                Ok(changed) => {
                    prop_assert!(legal);
                    if changed {
                        prop_assert!(fleet[i].generation > before.generation, "generation must increase");
                    } else {
                        prop_assert_eq!(&fleet[i], &before, "a no-op changed the record");
                    }
                    prop_assert!(!before.state.is_terminal(), "left a terminal state");
                }
                Err(e) => {
                    prop_assert!(!legal);
                    prop_assert_eq!(e.kind(), lablink_core::ErrorKind::InvalidTransition);
                    prop_assert_eq!(&fleet[i], &before, "an illegal event changed the record");
                }
            }
            // Owner present exactly when the state is owned.
            for r in &fleet {
                prop_assert_eq!(r.assignment.is_some(), r.state.is_owned(), "{}", r.state);
            }
            // No email owns two VMs (one owner per VM holds by construction).
            let mut owners: HashMap<&Email, &Hostname> = HashMap::new();
            for r in &fleet {
                if let Some(e) = r.owner() {
                    prop_assert!(owners.insert(e, &r.hostname).is_none(), "{} owns two VMs", e);
                }
            }
        }
    }

    #[test]
    fn terminated_is_terminal(event in strategies::vm_event()) {
        prop_assert!(transition(&VmState::Terminated, &event).is_err());
    }

    #[test]
    fn claim_is_legal_only_on_available(state in strategies::vm_state(), a in strategies::assignment()) {
        let legal = transition(&state, &VmEvent::Claim(a)).is_ok();
        prop_assert_eq!(legal, state == VmState::Available);
    }

    #[test]
    fn a_claimed_vm_cannot_be_claimed_again(a in strategies::assignment(), b in strategies::assignment()) {
        let mut r = fleet(1).remove(0);
        r.state = VmState::Available;
        r.apply(&VmEvent::Claim(a.clone()), t0()).unwrap();
        let before = r.clone();
        prop_assert!(r.apply(&VmEvent::Claim(b), t0()).is_err());
        prop_assert_eq!(r.owner(), Some(&a.email));
        prop_assert_eq!(r, before);
    }
}
