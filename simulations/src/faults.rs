//! Fault injection: the actions the fault schedule draws from, weighted by the seed's
//! `SimConfig`. Faults are only those the system is meant to survive: crashes that keep fsynced
//! data, restarts, partitions (symmetric and one-way), message loss bursts; delay and reordering
//! are always on (see `network`).
//!
//! To add a fault: add a variant to `Fault`, a weight to `SimConfig`, a line to `draw`, and its
//! effect to `inject`. Undo it in `sim::heal_all` if it must end before convergence is checked.

use cairn_consensus::domain::NodeId;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::world::{crash_node, lock, start_node, NodeError, Shared, World};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    Crash(NodeId),
    Restart(NodeId),
    /// Cuts every link between `side` and the other nodes, both ways.
    Partition(Vec<NodeId>),
    /// Drops what `from` sends to `to` (not the other way).
    OneWay {
        from: NodeId,
        to: NodeId,
    },
    Heal,
    /// Loss probability (ppm) for a duration (ms).
    LossBurst {
        loss_ppm: u32,
        duration_ms: u64,
    },
}

/// Draws the next fault, or `None` when the drawn kind does not apply now (nothing to restart).
pub fn draw(world: &mut World) -> Option<Fault> {
    let config = world.config.clone();
    let weights = [
        config.weight_crash,
        config.weight_restart,
        config.weight_partition,
        config.weight_one_way,
        config.weight_heal,
        config.weight_loss_burst,
    ];
    let total: u32 = weights.iter().sum();
    if total == 0 {
        return None;
    }
    let mut pick = world.rng.gen_range(0..total);
    let mut kind = 0;
    for (index, weight) in weights.iter().enumerate() {
        if pick < *weight {
            kind = index;
            break;
        }
        pick -= weight;
    }
    let ids: Vec<NodeId> = world.nodes.keys().copied().collect();
    match kind {
        0 => world
            .running_ids()
            .choose(&mut world.rng)
            .copied()
            .map(Fault::Crash),
        1 => world
            .down_ids()
            .choose(&mut world.rng)
            .copied()
            .map(Fault::Restart),
        2 => {
            let size = world.rng.gen_range(1..ids.len());
            let side: Vec<NodeId> = ids.choose_multiple(&mut world.rng, size).copied().collect();
            let mut side = side;
            side.sort_unstable();
            Some(Fault::Partition(side))
        }
        3 => {
            let pair: Vec<NodeId> = ids.choose_multiple(&mut world.rng, 2).copied().collect();
            Some(Fault::OneWay {
                from: pair[0],
                to: pair[1],
            })
        }
        4 => Some(Fault::Heal),
        _ => Some(Fault::LossBurst {
            loss_ppm: world.rng.gen_range(100_000..=500_000),
            duration_ms: world.rng.gen_range(100..=2_000),
        }),
    }
}

pub async fn inject(shared: &Shared, fault: Fault) -> Result<(), NodeError> {
    lock(shared).record(format_args!("fault {fault:?}"));
    match fault {
        Fault::Crash(node_id) => crash_node(shared, node_id).await,
        Fault::Restart(node_id) => start_node(shared, node_id).await?,
        Fault::Partition(side) => {
            let mut world = lock(shared);
            let ids: Vec<NodeId> = world.nodes.keys().copied().collect();
            for a in &side {
                for b in ids.iter().filter(|id| !side.contains(id)) {
                    world.net.blocked.insert((*a, *b));
                    world.net.blocked.insert((*b, *a));
                }
            }
        }
        Fault::OneWay { from, to } => {
            lock(shared).net.blocked.insert((from, to));
        }
        Fault::Heal => lock(shared).net.heal(false),
        Fault::LossBurst {
            loss_ppm,
            duration_ms,
        } => {
            let mut world = lock(shared);
            let until = world.now_ms() + duration_ms;
            world.net.burst = Some((loss_ppm, until));
        }
    }
    Ok(())
}
