//! Boot sessions and the two copies of their writable layers (DESIGN.md "Two copies of every
//! writable layer"): where a boot goes, which copies of a persistent layer are current, and the
//! commands the nodes serving a session propose when one of them fails (a standby dropped, a
//! failover, a standby assigned and resynced).
//!
//! The rules that keep an acknowledged write from being lost:
//! - A session's primary is always a node with a current copy: for a persistent layer, one of
//!   its in-sync homes; a failover promotes only an in-sync standby.
//! - A copy leaves the in-sync set as soon as a primary may write without it (a boot or a
//!   failover that does not make it the in-sync standby, a standby dropped), and enters it only
//!   when its resync is recorded complete.
//! - Every change of primary or standby raises the generation, and the commands the nodes
//!   propose name the generation they saw: of two nodes that suspect each other, only the first
//!   to commit wins; the other's command is refused.

use super::command::DiskMode;
use super::event::EventPayload;
use super::rejection::{EntityKind, Rejection};
use super::state::{BootSession, LayerCopies, StandbyCopy, State, LAYER_HOMES_MAX};
use super::types::{Mac, Name, NodeId};

impl State {
    /// Where a boot of `mac` into `image` in `mode` goes: (primary, standby).
    ///
    /// A new persistent layer, and every non-persistent one, goes to the least loaded healthy
    /// node with the next one as standby. An existing persistent layer boots on a healthy home
    /// whose copy is current (refused, with the reason, while none is up), with its other home
    /// as standby if that one is up, or else another node, which a resync brings up to date.
    pub(super) fn place_boot(
        &self,
        mac: &Mac,
        image: &Name,
        mode: DiskMode,
    ) -> Result<(NodeId, Option<NodeId>), Rejection> {
        let copies = self
            .clients
            .get(mac)
            .and_then(|client| client.layers.get(image))
            .filter(|copies| !copies.homes.is_empty());
        let no_node = || Rejection::Conflict {
            reason: "no healthy storage node can take a boot".into(),
        };
        let (DiskMode::Persistent, Some(copies)) = (mode, copies) else {
            return self.place(mac).ok_or_else(no_node);
        };
        let candidates = self.placement_candidates(mac, &[]);
        let healthy = |node: &NodeId| self.nodes.get(node).is_some_and(|n| n.healthy);
        // Least loaded in-sync home; a draining one only if it is the only current copy up.
        let primary = candidates
            .iter()
            .copied()
            .find(|node| copies.in_sync.contains(node))
            .or_else(|| copies.in_sync.iter().copied().find(healthy))
            .ok_or_else(|| Rejection::Conflict {
                reason: format!(
                    "the current copy of the persistent disk of client {mac} for image {image} \
                     is on node {}, which is down",
                    join_nodes(&copies.in_sync)
                ),
            })?;
        Ok((primary, self.pick_standby(mac, Some(copies), &[primary])))
    }

    /// A standby for a session of `mac` among healthy, non-draining nodes other than
    /// `exclude`: a node that already holds a copy of the layer first (its resync sends only
    /// what differs), then the least loaded.
    fn pick_standby(
        &self,
        mac: &Mac,
        copies: Option<&LayerCopies>,
        exclude: &[NodeId],
    ) -> Option<NodeId> {
        let candidates = self.placement_candidates(mac, exclude);
        copies
            .and_then(|copies| {
                candidates
                    .iter()
                    .copied()
                    .find(|node| copies.homes.contains(node))
            })
            .or_else(|| candidates.first().copied())
    }

    /// The node `AssignStandby` would pick for `session` now.
    pub fn pick_standby_for(&self, session: &BootSession) -> Option<NodeId> {
        self.pick_standby(
            &session.mac,
            self.session_copies(session),
            &[session.primary],
        )
    }

    fn session_copies(&self, session: &BootSession) -> Option<&LayerCopies> {
        if session.mode != DiskMode::Persistent {
            return None;
        }
        self.clients.get(&session.mac)?.layers.get(&session.image)
    }

    /// What marking `node_id` down implies for the sessions it takes part in: where it is
    /// primary and the standby is in sync and up, a failover; where it is standby, the standby
    /// is dropped. Sessions whose only current copy is on it stay (nothing else can serve them).
    pub(super) fn failovers_from(&self, node_id: NodeId) -> Vec<EventPayload> {
        let mut events = Vec::new();
        for session in self.boot_sessions.values() {
            if session.primary == node_id {
                let Some(standby) = session
                    .standby
                    .filter(|_| session.standby_copy == StandbyCopy::InSync)
                    .filter(|s| self.nodes.get(s).is_some_and(|n| n.healthy))
                else {
                    continue;
                };
                events.push(EventPayload::BootFailedOver {
                    mac: session.mac,
                    from: node_id,
                    primary: standby,
                    standby: self.pick_standby(
                        &session.mac,
                        self.session_copies(session),
                        &[node_id, standby],
                    ),
                    generation: session.generation + 1,
                });
            } else if session.standby == Some(node_id) {
                events.push(EventPayload::StandbyDropped {
                    mac: session.mac,
                    standby: node_id,
                    generation: session.generation + 1,
                });
            }
        }
        events
    }

    /// The session of `mac`, if it is at `generation`.
    fn session_at(&self, mac: &Mac, generation: u64) -> Result<&BootSession, Rejection> {
        let session = self
            .boot_sessions
            .get(mac)
            .ok_or_else(|| Rejection::NotFound {
                kind: EntityKind::BootSession,
                name: mac.to_string(),
            })?;
        if session.generation != generation {
            return Err(Rejection::Conflict {
                reason: format!(
                    "the session of client {mac} is at generation {}, not {generation}",
                    session.generation
                ),
            });
        }
        Ok(session)
    }

    pub(super) fn decide_drop_standby(
        &self,
        mac: &Mac,
        generation: u64,
    ) -> Result<Vec<EventPayload>, Rejection> {
        let session = self.session_at(mac, generation)?;
        let standby = session.standby.ok_or_else(|| Rejection::Unchanged {
            what: format!("the session of client {mac} has no standby"),
        })?;
        Ok(vec![EventPayload::StandbyDropped {
            mac: *mac,
            standby,
            generation: generation + 1,
        }])
    }

    pub(super) fn decide_fail_over(
        &self,
        mac: &Mac,
        generation: u64,
    ) -> Result<Vec<EventPayload>, Rejection> {
        let session = self.session_at(mac, generation)?;
        let standby = session
            .standby
            .filter(|_| session.standby_copy == StandbyCopy::InSync)
            .ok_or_else(|| Rejection::Conflict {
                reason: format!("the session of client {mac} has no in-sync standby"),
            })?;
        if !self.nodes.get(&standby).is_some_and(|node| node.healthy) {
            return Err(Rejection::Conflict {
                reason: format!("the standby of client {mac}, node {standby}, is down"),
            });
        }
        Ok(vec![EventPayload::BootFailedOver {
            mac: *mac,
            from: session.primary,
            primary: standby,
            standby: self.pick_standby(
                mac,
                self.session_copies(session),
                &[session.primary, standby],
            ),
            generation: generation + 1,
        }])
    }

    pub(super) fn decide_assign_standby(
        &self,
        mac: &Mac,
        generation: u64,
    ) -> Result<Vec<EventPayload>, Rejection> {
        let session = self.session_at(mac, generation)?;
        if session.standby.is_some() {
            return Err(Rejection::Unchanged {
                what: format!("the session of client {mac} has a standby"),
            });
        }
        let standby = self
            .pick_standby(mac, self.session_copies(session), &[session.primary])
            .ok_or_else(|| Rejection::Conflict {
                reason: "no healthy storage node can take a standby".into(),
            })?;
        Ok(vec![EventPayload::StandbyAssigned {
            mac: *mac,
            standby,
            generation: generation + 1,
        }])
    }

    pub(super) fn decide_standby_in_sync(
        &self,
        mac: &Mac,
        generation: u64,
        standby: NodeId,
    ) -> Result<Vec<EventPayload>, Rejection> {
        let session = self.session_at(mac, generation)?;
        if session.standby != Some(standby) {
            return Err(Rejection::Conflict {
                reason: format!("node {standby} is not the standby of client {mac}"),
            });
        }
        if session.standby_copy == StandbyCopy::InSync {
            return Err(Rejection::Unchanged {
                what: format!("the standby of client {mac} is in sync"),
            });
        }
        Ok(vec![EventPayload::StandbyInSync {
            mac: *mac,
            standby,
            generation,
        }])
    }

    /// Applies a boot's placement to the persistent layer's copies; returns the standby's copy
    /// state.
    pub(super) fn copies_at_boot(
        &mut self,
        mac: &Mac,
        image: &Name,
        primary: NodeId,
        standby: Option<NodeId>,
    ) -> StandbyCopy {
        let Some(client) = self.clients.get_mut(mac) else {
            return StandbyCopy::InSync;
        };
        let copies = client.layers.entry(image.clone()).or_default();
        if copies.homes.is_empty() {
            // A new layer: both copies start empty, hence equal.
            copies.homes.extend([primary].into_iter().chain(standby));
            copies.in_sync = copies.homes.clone();
            return StandbyCopy::InSync;
        }
        let copy = standby.map_or(StandbyCopy::InSync, |node| copy_state(copies, node));
        settle_copies(copies, primary, standby, copy);
        copy
    }

    /// Applies a change of a session's primary (a failover) and standby (assigned, dropped, or
    /// chosen at the failover) at `generation`.
    pub(super) fn apply_session_change(
        &mut self,
        mac: &Mac,
        generation: u64,
        primary: Option<NodeId>,
        standby: Option<NodeId>,
    ) {
        let Some(session) = self.boot_sessions.get_mut(mac) else {
            return;
        };
        session.generation = generation;
        if let Some(primary) = primary {
            session.primary = primary;
        }
        session.standby = standby;
        let copies = match session.mode {
            DiskMode::Persistent => self
                .clients
                .get_mut(mac)
                .map(|client| client.layers.entry(session.image.clone()).or_default()),
            DiskMode::NonPersistent => None,
        };
        session.standby_copy = match (standby, &copies) {
            (None, _) => StandbyCopy::InSync,
            (Some(node), Some(copies)) => copy_state(copies, node),
            // A non-persistent layer's new standby starts from the base and is resynced.
            (Some(_), None) => StandbyCopy::Fresh,
        };
        if let Some(copies) = copies {
            settle_copies(copies, session.primary, standby, session.standby_copy);
        }
    }

    pub(super) fn apply_standby_in_sync(&mut self, mac: &Mac, standby: NodeId) {
        let Some(session) = self.boot_sessions.get_mut(mac) else {
            return;
        };
        if session.standby != Some(standby) {
            return;
        }
        session.standby_copy = StandbyCopy::InSync;
        if session.mode == DiskMode::Persistent {
            if let Some(client) = self.clients.get_mut(mac) {
                let copies = client.layers.entry(session.image.clone()).or_default();
                copies.homes.insert(standby);
                copies.in_sync.insert(standby);
            }
        }
    }
}

fn copy_state(copies: &LayerCopies, node: NodeId) -> StandbyCopy {
    if copies.in_sync.contains(&node) {
        StandbyCopy::InSync
    } else if copies.homes.contains(&node) {
        StandbyCopy::Stale
    } else {
        StandbyCopy::Fresh
    }
}

/// After a session's primary or standby changed: both are homes, only they can be current (the
/// primary writes without any other copy), and a home that is neither is let go when the layer
/// would have more than [`LAYER_HOMES_MAX`].
fn settle_copies(
    copies: &mut LayerCopies,
    primary: NodeId,
    standby: Option<NodeId>,
    standby_copy: StandbyCopy,
) {
    copies.homes.insert(primary);
    copies.homes.extend(standby);
    let standby_current = standby.filter(|_| standby_copy == StandbyCopy::InSync);
    copies
        .in_sync
        .retain(|node| *node == primary || Some(*node) == standby_current);
    while copies.homes.len() > LAYER_HOMES_MAX {
        let Some(extra) = copies
            .homes
            .iter()
            .copied()
            .find(|node| *node != primary && Some(*node) != standby)
        else {
            break;
        };
        copies.homes.remove(&extra);
    }
}

fn join_nodes(nodes: &std::collections::BTreeSet<NodeId>) -> String {
    nodes
        .iter()
        .map(|node| node.to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}
