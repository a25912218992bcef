//! Acknowledged commands are in the log: when `propose` returned `Ok(events)` to a client, those
//! exact events are in the committed history at their sequence numbers, for good.
//!
//! Checked when the acknowledgement arrives (against what is already committed) and at the end
//! (every acknowledged event must be in the final history).

use cairn_consensus::domain::{Event, NodeId};

use super::{Checks, Violation};

const NAME: &str = "acknowledged";

#[derive(Clone, Debug)]
pub struct Acknowledged {
    pub client: u32,
    pub via: NodeId,
    pub kind: &'static str,
    pub events: Vec<Event>,
}

fn check_one(
    history: &[Event],
    ack: &Acknowledged,
    must_be_present: bool,
) -> Result<(), Violation> {
    for event in &ack.events {
        match history.get(event.seq as usize - 1) {
            Some(committed) if committed == event => {}
            Some(committed) => {
                return Err(Violation::new(
                    NAME,
                    format!(
                        "client {} was told {} (via n{}) committed {event:?}, but event {} is {committed:?}",
                        ack.client, ack.kind, ack.via, event.seq
                    ),
                ))
            }
            None if must_be_present => {
                return Err(Violation::new(
                    NAME,
                    format!(
                        "client {} was told {} (via n{}) committed event {}, but the history ends at {}",
                        ack.client,
                        ack.kind,
                        ack.via,
                        event.seq,
                        history.len()
                    ),
                ))
            }
            None => {}
        }
    }
    Ok(())
}

/// Records an acknowledgement and checks it against the history seen so far.
pub fn record(checks: &mut Checks, ack: Acknowledged) -> Result<(), Violation> {
    let result = check_one(&checks.history, &ack, false);
    checks.acknowledged.push(ack);
    result
}

/// Every acknowledged event is in the final history.
pub fn check_final(checks: &Checks) -> Result<(), Violation> {
    for ack in &checks.acknowledged {
        check_one(&checks.history, ack, true)?;
    }
    Ok(())
}
