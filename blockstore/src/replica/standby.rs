//! The standby's shell: see the module docs of `replica`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{lock, MirrorLink};
use crate::mirror::{
    Message, MirrorConfig, Operation, Standby, StandbyAction, StandbyEvent, VolumeId,
};
use crate::volume::{MirrorOperation, Volume};

struct StandbyState {
    core: Standby,
}

/// Messages from the primary not handled yet, and whether a thread is draining them.
#[derive(Default)]
struct Inbox {
    messages: Vec<Message>,
    draining: bool,
}

/// The standby's side of a session's mirror: the core and the copy it keeps up to date.
pub struct StandbyShell {
    state: Mutex<StandbyState>,
    inbox: Mutex<Inbox>,
    volume: Arc<Volume>,
    peer: u64,
    link: Arc<dyn MirrorLink>,
}

impl StandbyShell {
    /// `restarted`: the session's generation is older than this node's start (see
    /// [`Standby::new`]).
    pub fn new(
        volume_id: VolumeId,
        generation: u64,
        restarted: bool,
        volume: Arc<Volume>,
        peer: u64,
        config: MirrorConfig,
        link: Arc<dyn MirrorLink>,
    ) -> Arc<StandbyShell> {
        let core = Standby::new(
            Instant::now(),
            volume_id,
            generation,
            rand::random(),
            restarted,
            config,
        );
        Arc::new(StandbyShell {
            state: Mutex::new(StandbyState { core }),
            inbox: Mutex::default(),
            volume,
            peer,
            link,
        })
    }

    pub fn generation(&self) -> u64 {
        lock(&self.state).core.generation()
    }

    pub fn peer(&self) -> u64 {
        self.peer
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    /// Takes a message from the primary; returns at once. The messages are handled in
    /// arrival order on a blocking-pool thread (inline without a tokio runtime), in batches:
    /// whatever arrived while the last batch was applied is applied next and acknowledged
    /// with one message. The core's events (a storage failure among them) come out of
    /// [`StandbyShell::tick`].
    pub fn handle_message(self: &Arc<Self>, message: Message) {
        let start = {
            let mut inbox = lock(&self.inbox);
            inbox.messages.push(message);
            !std::mem::replace(&mut inbox.draining, true)
        };
        if !start {
            return;
        }
        let shell = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || shell.drain())),
            Err(_) => shell.drain(),
        }
    }

    /// Handles the inbox until it is empty.
    fn drain(&self) {
        loop {
            let batch = {
                let mut inbox = lock(&self.inbox);
                if inbox.messages.is_empty() {
                    inbox.draining = false;
                    return;
                }
                std::mem::take(&mut inbox.messages)
            };
            let mut state = lock(&self.state);
            for message in batch {
                state.core.handle_message(Instant::now(), message);
                self.apply(&mut state);
            }
            self.transmit(&mut state);
        }
    }

    pub fn tick(&self) -> Vec<StandbyEvent> {
        let mut state = lock(&self.state);
        state.core.handle_timeout(Instant::now());
        self.apply(&mut state);
        self.transmit(&mut state);
        std::iter::from_fn(|| state.core.poll_event()).collect()
    }

    /// The failover made this node primary: the instant it may serve from.
    pub fn promote(&self) -> Instant {
        lock(&self.state).core.promote(Instant::now())
    }

    /// Applies to the copy what the core asks for, in order.
    fn apply(&self, state: &mut StandbyState) {
        while let Some(action) = state.core.poll_action() {
            match action {
                StandbyAction::Apply { seq, operation } => {
                    let generation = state.core.generation();
                    let result = match &operation {
                        Operation::Write { first_block, data } => self.volume.apply_mirrored(
                            generation,
                            MirrorOperation::Write {
                                first_block: *first_block,
                                data,
                            },
                        ),
                        Operation::Unmap {
                            first_block,
                            block_count,
                        } => self.volume.apply_mirrored(
                            generation,
                            MirrorOperation::Unmap {
                                first_block: *first_block,
                                block_count: *block_count,
                            },
                        ),
                        Operation::Discard {
                            first_block,
                            block_count,
                        } => self.volume.apply_mirrored(
                            generation,
                            MirrorOperation::Discard {
                                first_block: *first_block,
                                block_count: *block_count,
                            },
                        ),
                        Operation::Flush | Operation::Digest { .. } => Ok(()),
                    };
                    state
                        .core
                        .handle_applied(seq, result.map_err(|e| e.to_string()));
                }
                StandbyAction::Flush { seq } => {
                    let result = self.volume.flush().map_err(|e| e.to_string());
                    let ok = result.is_ok();
                    state.core.handle_applied(seq, result.clone());
                    if ok {
                        state.core.handle_flushed(seq, result);
                    }
                }
                StandbyAction::Digest { seq, region } => match self.volume.region_digest(region) {
                    Ok(digest) => state.core.handle_digest(seq, region, digest),
                    Err(error) => state.core.handle_applied(seq, Err(error.to_string())),
                },
            }
        }
    }

    fn transmit(&self, state: &mut StandbyState) {
        while let Some(message) = state.core.poll_transmit() {
            self.link.send(self.peer, message);
        }
    }
}
