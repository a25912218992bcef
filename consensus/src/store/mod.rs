//! Raft storage: the log store and the state machine, on RocksDB (`rocks`) and in memory (`mem`).
//!
//! Both state machines share `StateMachineCore` (how an entry is applied) and the snapshot format
//! (`snapshot`), so the simulation exercises exactly the apply logic the real node runs.
//!
//! Invariants:
//! - The events are the durable truth; `State` is a projection rebuilt by folding them.
//! - A snapshot carries the whole event history (not just the projection), so purging the Raft
//!   log never loses history and a node that joins late receives all of it.
//! - A failed write to the log or the state machine is fatal: the store poisons itself and every
//!   later call fails, and openraft stops the node on the returned `StorageError`.

pub mod mem;
pub mod rocks;
pub mod snapshot;

use openraft::{EntryPayload, StorageIOError};

use crate::domain::{Event, State};
use crate::types::{BatchOutcome, Entry, LogId, StorageError, StoredMembership};

/// The apply step shared by every state machine: what one committed entry does to the projection.
#[derive(Clone, Debug, Default)]
pub struct StateMachineCore {
    pub state: State,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

impl StateMachineCore {
    /// Applies one entry. Returns the Raft response (one `Outcome` per proposal of a batch) and
    /// the events to persist, in sequence order (none for blank and membership entries, and none
    /// from a rejected proposal: a rejection writes nothing but `last_applied`).
    pub fn apply_entry(&mut self, entry: &Entry) -> (BatchOutcome, Vec<Event>) {
        self.last_applied = Some(entry.log_id);
        match &entry.payload {
            EntryPayload::Blank => (Vec::new(), Vec::new()),
            EntryPayload::Membership(membership) => {
                self.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                (Vec::new(), Vec::new())
            }
            EntryPayload::Normal(batch) => {
                let mut outcomes = Vec::with_capacity(batch.proposals.len());
                let mut written = Vec::new();
                for proposal in &batch.proposals {
                    let outcome = self.state.execute(proposal);
                    if let Ok(events) = &outcome {
                        written.extend_from_slice(events);
                    }
                    outcomes.push(outcome);
                }
                (outcomes, written)
            }
        }
    }
}

pub(crate) fn write_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::write(&std::io::Error::other(error.to_string())).into()
}

pub(crate) fn read_error(error: impl std::fmt::Display) -> StorageError {
    StorageIOError::read(&std::io::Error::other(error.to_string())).into()
}

#[cfg(test)]
mod tests {
    //! A batch entry writes exactly what one entry per proposal would: the same outcomes, the
    //! same dense events, the same state (and replaying the events gives that state).

    use openraft::{CommittedLeaderId, EntryPayload};
    use proptest::prelude::*;

    use super::*;
    use crate::domain::{replay, Command, Name, Outcome, Proposal, ReplayBound};
    use crate::types::ProposalBatch;

    fn entry(index: u64, proposals: Vec<Proposal>) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(ProposalBatch { proposals }),
        }
    }

    fn proposal(time_ms: i64, command: Command) -> Proposal {
        Proposal {
            actor: Name::new("admin").unwrap(),
            time_ms,
            command,
        }
    }

    fn create(name: &str) -> Command {
        Command::CreateImage {
            name: Name::new(name).unwrap(),
            description: String::new(),
        }
    }

    #[test]
    fn a_rejected_proposal_in_a_batch_writes_nothing_and_spares_the_others() {
        let mut core = StateMachineCore::default();
        let (outcomes, events) = core.apply_entry(&entry(
            1,
            vec![
                proposal(10, create("a")),
                proposal(11, create("a")),
                proposal(12, create("b")),
            ],
        ));
        assert_eq!(outcomes.len(), 3);
        assert_eq!(outcomes[0].as_ref().unwrap()[0].seq, 1);
        assert!(outcomes[1].is_err(), "duplicate name is rejected");
        assert_eq!(outcomes[2].as_ref().unwrap()[0].seq, 2);
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(core.state.last_seq, 2);
        assert_eq!(
            replay(&events, ReplayBound::Everything).unwrap(),
            core.state
        );
    }

    fn command() -> impl Strategy<Value = Command> {
        let name = prop::sample::select(vec!["a", "b", "c", "d"]);
        prop_oneof![
            name.clone().prop_map(create),
            name.clone().prop_map(|n| Command::RemoveImage {
                name: Name::new(n).unwrap()
            }),
            name.prop_map(|n| Command::BeginImageVersion {
                image: Name::new(n).unwrap()
            }),
        ]
    }

    proptest! {
        #[test]
        fn batched_apply_equals_one_entry_per_proposal(
            commands in prop::collection::vec(command(), 0..60),
            cuts in prop::collection::vec(1usize..8, 0..60),
        ) {
            let proposals: Vec<Proposal> = commands
                .into_iter()
                .enumerate()
                .map(|(i, command)| proposal(1_000 + i as i64, command))
                .collect();

            let mut single = StateMachineCore::default();
            let mut single_outcomes: Vec<Outcome> = Vec::new();
            let mut single_events = Vec::new();
            for (i, p) in proposals.iter().enumerate() {
                let (outcomes, events) = single.apply_entry(&entry(i as u64 + 1, vec![p.clone()]));
                prop_assert_eq!(outcomes.len(), 1);
                single_outcomes.extend(outcomes);
                single_events.extend(events);
            }

            let mut batched = StateMachineCore::default();
            let mut batched_outcomes: Vec<Outcome> = Vec::new();
            let mut batched_events = Vec::new();
            let mut rest = proposals.as_slice();
            let mut cuts = cuts.into_iter().chain(std::iter::repeat(3));
            let mut index = 1;
            while !rest.is_empty() {
                let take = cuts.next().unwrap_or(3).min(rest.len());
                let (batch, tail) = rest.split_at(take);
                let (outcomes, events) = batched.apply_entry(&entry(index, batch.to_vec()));
                prop_assert_eq!(outcomes.len(), batch.len());
                batched_outcomes.extend(outcomes);
                batched_events.extend(events);
                rest = tail;
                index += 1;
            }

            prop_assert_eq!(&batched_outcomes, &single_outcomes);
            prop_assert_eq!(&batched_events, &single_events);
            prop_assert_eq!(&batched.state, &single.state);
            for (i, event) in batched_events.iter().enumerate() {
                prop_assert_eq!(event.seq, i as u64 + 1);
            }
            let replayed = replay(&batched_events, ReplayBound::Everything).unwrap();
            prop_assert_eq!(replayed.hash(), batched.state.hash());
        }
    }
}
