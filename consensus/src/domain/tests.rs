//! Domain tests: specific cases through one `run` helper, and a property test that random command
//! streams keep the two invariants the rest of the system relies on: a rejected command changes
//! nothing, and replaying the events gives exactly the live state.

use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::*;

fn name(text: &str) -> Name {
    Name::new(text).unwrap()
}

fn mac(last: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0, last])
}

fn proposal(time_ms: TimeMs, command: Command) -> Proposal {
    Proposal {
        actor: name("admin"),
        time_ms,
        command,
    }
}

/// Runs commands in order; returns the state and each command's outcome.
fn run(commands: Vec<Command>) -> (State, Vec<Outcome>) {
    let mut state = State::default();
    let mut events = vec![];
    let mut outcomes = vec![];
    for (i, command) in commands.into_iter().enumerate() {
        let before = state.clone();
        let outcome = state.execute(&proposal(1_000 + i as TimeMs, command));
        match &outcome {
            Ok(new) => events.extend(new.iter().cloned()),
            Err(_) => assert_eq!(state, before, "a rejected command changed the state"),
        }
        outcomes.push(outcome);
    }
    let replayed = replay(&events, ReplayBound::Everything).unwrap();
    assert_eq!(replayed, state);
    assert_eq!(replayed.hash(), state.hash());
    (state, outcomes)
}

fn register(node_id: NodeId, capacity_sessions: u32) -> Command {
    Command::RegisterNode {
        node_id,
        name: name(&format!("node-{node_id}")),
        raft_address: format!("127.0.0.{node_id}:7401"),
        api_address: format!("http://127.0.0.{node_id}:7400"),
        portal_address: format!("127.0.0.{node_id}:3260"),
        boot_address: format!("http://127.0.0.{node_id}:8080"),
        capacity_sessions,
    }
}

fn begin_boot(client: u8, image: &str) -> Command {
    Command::BeginBoot {
        mac: mac(client),
        image: name(image),
        user: None,
    }
}

fn assign_to_client(client: u8, image: &str, mode: DiskMode) -> Command {
    Command::Assign {
        target: AssignmentTarget::Client(mac(client)),
        image: name(image),
        mode,
        default: false,
        position: None,
    }
}

fn ready_image(image: &str) -> Vec<Command> {
    vec![
        Command::CreateImage {
            name: name(image),
            description: "test".into(),
        },
        Command::BeginImageVersion { image: name(image) },
        Command::CompleteImageVersion {
            image: name(image),
            version: 1,
            manifest: Hash32::of(image.as_bytes()),
            size_bytes: 1 << 20,
        },
    ]
}

#[test]
fn rejections_are_precise() {
    let (_, outcomes) = run(vec![
        Command::AddClient {
            mac: mac(1),
            name: name("pc1"),
            group: Some(name("lab")),
        },
        Command::AddGroup {
            name: name("lab"),
            description: String::new(),
        },
        Command::AddClient {
            mac: mac(1),
            name: name("pc1"),
            group: Some(name("lab")),
        },
        Command::AddClient {
            mac: mac(1),
            name: name("pc1b"),
            group: None,
        },
        Command::AddClient {
            mac: mac(2),
            name: name("pc1"),
            group: None,
        },
        Command::RemoveGroup { name: name("lab") },
        assign_to_client(1, "missing", DiskMode::Persistent),
    ]);
    let errors: Vec<String> = outcomes
        .iter()
        .map(|o| o.as_ref().err().map(|e| e.to_string()).unwrap_or_default())
        .collect();
    assert_eq!(
        errors,
        vec![
            "group lab not found".to_string(),
            String::new(),
            String::new(),
            "client 52:54:00:00:00:01 already exists".into(),
            "client pc1 (52:54:00:00:00:01) already exists".into(),
            "group lab is in use: client pc1 (52:54:00:00:00:01) is a member".into(),
            "image missing not found".into(),
        ]
    );
}

#[test]
fn boots_spread_by_load_for_capacity_and_bump_generations() {
    let mut commands = vec![register(1, 10), register(2, 10), register(3, 20)];
    commands.extend(ready_image("debian"));
    commands.push(Command::AddGroup {
        name: name("lab"),
        description: String::new(),
    });
    commands.push(Command::Assign {
        target: AssignmentTarget::Group(name("lab")),
        image: name("debian"),
        mode: DiskMode::NonPersistent,
        default: true,
        position: None,
    });
    for i in 1..=8 {
        commands.push(Command::AddClient {
            mac: mac(i),
            name: name(&format!("pc{i}")),
            group: Some(name("lab")),
        });
        commands.push(begin_boot(i, "debian"));
    }
    commands.push(begin_boot(1, "debian"));
    let (state, outcomes) = run(commands);
    assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    let per_node = state.sessions_per_node();
    // Node 3 has twice the capacity, so it carries twice the sessions.
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 4]
    );
    for session in state.boot_sessions.values() {
        assert_ne!(Some(session.primary), session.standby);
        assert_eq!(session.mode, DiskMode::NonPersistent);
    }
    assert_eq!(state.boot_sessions[&mac(1)].generation, 2);
    assert_eq!(state.boot_sessions[&mac(2)].generation, 1);
}

#[test]
fn draining_and_unhealthy_nodes_get_no_boots() {
    let mut commands = vec![register(1, 10), register(2, 10)];
    commands.extend(ready_image("img"));
    commands.push(Command::AddClient {
        mac: mac(1),
        name: name("pc1"),
        group: None,
    });
    commands.push(assign_to_client(1, "img", DiskMode::NonPersistent));
    commands.push(Command::SetNodeDraining {
        node_id: 1,
        draining: true,
    });
    commands.push(begin_boot(1, "img"));
    commands.push(Command::SetNodeHealth {
        node_id: 2,
        healthy: false,
    });
    commands.push(begin_boot(1, "img"));
    let (state, outcomes) = run(commands);
    assert_eq!(state.boot_sessions[&mac(1)].primary, 2);
    assert_eq!(state.boot_sessions[&mac(1)].standby, None);
    assert_eq!(
        outcomes.last().unwrap().as_ref().unwrap_err().to_string(),
        "conflict: no healthy storage node can take a boot"
    );
}

/// Three nodes, an image, pc1 non-persistent and pc2 persistent, both booted: pc1 on node 1
/// (standby 2), pc2 on node 2 (standby 3, a new layer with two homes in sync).
fn two_sessions() -> Vec<Command> {
    let mut commands = vec![register(1, 10), register(2, 10), register(3, 10)];
    commands.extend(ready_image("img"));
    for i in 1..=2 {
        commands.push(Command::AddClient {
            mac: mac(i),
            name: name(&format!("pc{i}")),
            group: None,
        });
    }
    commands.push(assign_to_client(1, "img", DiskMode::NonPersistent));
    commands.push(assign_to_client(2, "img", DiskMode::Persistent));
    for i in 1..=2 {
        commands.push(begin_boot(i, "img"));
    }
    commands
}

fn health(node_id: NodeId, healthy: bool) -> Command {
    Command::SetNodeHealth { node_id, healthy }
}

fn copies(state: &State, client: u8) -> (Vec<NodeId>, Vec<NodeId>) {
    let copies = &state.clients[&mac(client)].layers[&name("img")];
    (
        copies.homes.iter().copied().collect(),
        copies.in_sync.iter().copied().collect(),
    )
}

fn session(state: &State, client: u8) -> (NodeId, Option<NodeId>, StandbyCopy, u64) {
    let s = &state.boot_sessions[&mac(client)];
    (s.primary, s.standby, s.standby_copy, s.generation)
}

#[test]
fn a_dead_primary_fails_over_to_its_in_sync_standby_at_the_next_generation() {
    let mut commands = two_sessions();
    let (before, outcomes) = run(commands.clone());
    assert!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    assert_eq!(session(&before, 1), (1, Some(2), StandbyCopy::InSync, 1));
    assert_eq!(session(&before, 2), (2, Some(3), StandbyCopy::InSync, 1));
    assert_eq!(copies(&before, 2), (vec![2, 3], vec![2, 3]));

    // Node 1 dies: pc1's standby serves, fenced by a new generation; node 3 is its new
    // standby, empty until a resync fills it. pc2 is untouched.
    commands.push(health(1, false));
    let (state, outcomes) = run(commands.clone());
    assert_eq!(outcomes.last().unwrap().as_ref().unwrap().len(), 2);
    assert_eq!(session(&state, 1), (2, Some(3), StandbyCopy::Fresh, 2));
    assert_eq!(state.generations[&mac(1)], 2);
    assert!(state.boot_sessions[&mac(1)].is_degraded());

    // Node 2 dies too. pc1's only current copy was there: it stays (node 3 lacks its data).
    // pc2 fails over to node 3, its in-sync standby, with no standby left; node 2's copy is
    // no longer current.
    commands.push(health(2, false));
    let (state, _) = run(commands.clone());
    assert_eq!(session(&state, 1), (2, Some(3), StandbyCopy::Fresh, 2));
    assert_eq!(session(&state, 2), (3, None, StandbyCopy::InSync, 2));
    assert_eq!(copies(&state, 2), (vec![2, 3], vec![3]));

    // A new boot of pc2 goes to its current copy; node 2, back, is its standby again and gets
    // only what changed (a stale home).
    commands.push(health(2, true));
    commands.push(begin_boot(2, "img"));
    let (state, outcomes) = run(commands.clone());
    assert!(outcomes.last().unwrap().is_ok(), "{outcomes:?}");
    assert_eq!(session(&state, 2), (3, Some(2), StandbyCopy::Stale, 3));
    commands.push(Command::MarkStandbyInSync {
        mac: mac(2),
        generation: 3,
        standby: 2,
    });
    let (state, outcomes) = run(commands);
    assert!(outcomes.last().unwrap().is_ok(), "{outcomes:?}");
    assert_eq!(session(&state, 2), (3, Some(2), StandbyCopy::InSync, 3));
    assert_eq!(copies(&state, 2), (vec![2, 3], vec![2, 3]));
}

#[test]
fn a_persistent_disk_whose_current_copy_is_down_is_not_booted_elsewhere() {
    let mut commands = two_sessions();
    // pc2's standby is dropped (its primary could not reach it), then the primary dies: the
    // only current copy is down, so the session stays and a new boot is refused.
    commands.push(Command::DropStandby {
        mac: mac(2),
        generation: 1,
    });
    commands.push(health(2, false));
    commands.push(begin_boot(2, "img"));
    let (state, outcomes) = run(commands);
    assert_eq!(session(&state, 2), (2, None, StandbyCopy::InSync, 2));
    assert_eq!(copies(&state, 2), (vec![2, 3], vec![2]));
    assert_eq!(
        outcomes.last().unwrap().as_ref().unwrap_err().to_string(),
        "conflict: the current copy of the persistent disk of client 52:54:00:00:00:02 for \
         image img is on node 2, which is down"
    );
}

#[test]
fn of_two_nodes_that_suspect_each_other_only_the_first_to_commit_wins() {
    let mut commands = two_sessions();
    commands.push(Command::FailOver {
        mac: mac(2),
        generation: 1,
    });
    commands.push(Command::DropStandby {
        mac: mac(2),
        generation: 1,
    });
    let (state, outcomes) = run(commands.clone());
    let n = outcomes.len();
    assert!(outcomes[n - 2].is_ok());
    assert_eq!(
        outcomes[n - 1].as_ref().unwrap_err().to_string(),
        "conflict: the session of client 52:54:00:00:00:02 is at generation 2, not 1"
    );
    // Node 3 took over; node 1 is the new standby, empty (it never held pc2's layer); node 2's
    // copy is not current and is let go to keep two homes.
    assert_eq!(session(&state, 2), (3, Some(1), StandbyCopy::Fresh, 2));
    assert_eq!(copies(&state, 2), (vec![1, 3], vec![3]));
    // A failover to a standby that is not in sync is refused.
    commands.push(Command::FailOver {
        mac: mac(2),
        generation: 2,
    });
    let (_, outcomes) = run(commands);
    assert_eq!(
        outcomes.last().unwrap().as_ref().unwrap_err().to_string(),
        "conflict: the session of client 52:54:00:00:00:02 has no in-sync standby"
    );
}

#[test]
fn a_dead_standby_is_dropped_and_a_new_one_assigned_prefers_a_node_with_a_copy() {
    let mut commands = two_sessions();
    commands.push(health(3, false));
    let (state, _) = run(commands.clone());
    assert_eq!(session(&state, 2), (2, None, StandbyCopy::InSync, 2));
    assert!(state.boot_sessions[&mac(2)].is_degraded());
    // With node 3 still down, node 1 can take the standby: an empty copy.
    commands.push(Command::AssignStandby {
        mac: mac(2),
        generation: 2,
    });
    let (state, _) = run(commands.clone());
    assert_eq!(session(&state, 2), (2, Some(1), StandbyCopy::Fresh, 3));
    // Marking it in sync needs the right standby and generation.
    commands.push(Command::MarkStandbyInSync {
        mac: mac(2),
        generation: 3,
        standby: 3,
    });
    commands.push(Command::MarkStandbyInSync {
        mac: mac(2),
        generation: 2,
        standby: 1,
    });
    let (_, outcomes) = run(commands.clone());
    let n = outcomes.len();
    assert!(outcomes[n - 2].is_err() && outcomes[n - 1].is_err());

    // Instead: drop node 1 again, bring node 3 back: it is preferred, holding an old copy.
    let mut commands = two_sessions();
    commands.push(health(3, false));
    commands.push(health(3, true));
    commands.push(Command::AssignStandby {
        mac: mac(2),
        generation: 2,
    });
    let (state, _) = run(commands);
    assert_eq!(session(&state, 2), (2, Some(3), StandbyCopy::Stale, 3));
}

#[test]
fn leases_are_never_doubled() {
    let lease = |ip: u8, m: u8, expires_ms: TimeMs| LeaseRequest {
        ip: Ipv4Addr::new(10, 0, 0, ip),
        mac: mac(m),
        expires_ms,
    };
    let (state, outcomes) = run(vec![
        Command::CommitLeases {
            leases: vec![lease(10, 1, 100_000), lease(11, 2, 100_000)],
        },
        Command::CommitLeases {
            leases: vec![lease(10, 3, 100_000)],
        },
        Command::CommitLeases {
            leases: vec![lease(12, 3, 100_000), lease(12, 4, 100_000)],
        },
        Command::CommitLeases {
            leases: vec![lease(20, 1, 100_000)],
        },
        Command::CommitLeases {
            leases: vec![lease(11, 5, 500)],
        },
    ]);
    assert!(outcomes[0].is_ok());
    assert_eq!(
        outcomes[1].as_ref().unwrap_err().to_string(),
        "conflict: address 10.0.0.10 is leased to 52:54:00:00:00:01"
    );
    assert!(outcomes[2].is_err());
    assert!(outcomes[3].is_ok(), "a MAC may move to another address");
    assert!(outcomes[4].is_err(), "expired request");
    let held: Vec<(Ipv4Addr, Mac)> = state.leases.values().map(|l| (l.ip, l.mac)).collect();
    assert_eq!(
        held,
        vec![
            (Ipv4Addr::new(10, 0, 0, 11), mac(2)),
            (Ipv4Addr::new(10, 0, 0, 20), mac(1))
        ]
    );
}

#[test]
fn menu_order_and_defaults_merge_client_then_group() {
    let mut commands = vec![];
    for image in ["a", "b", "c"] {
        commands.extend(ready_image(image));
    }
    commands.push(Command::AddGroup {
        name: name("lab"),
        description: String::new(),
    });
    commands.push(Command::AddClient {
        mac: mac(1),
        name: name("pc1"),
        group: Some(name("lab")),
    });
    let assign = |target: AssignmentTarget, image: &str, default: bool, position: Option<u32>| {
        Command::Assign {
            target,
            image: name(image),
            mode: DiskMode::Persistent,
            default,
            position,
        }
    };
    commands.push(assign(
        AssignmentTarget::Group(name("lab")),
        "a",
        true,
        None,
    ));
    commands.push(assign(
        AssignmentTarget::Group(name("lab")),
        "b",
        false,
        None,
    ));
    commands.push(assign(AssignmentTarget::Client(mac(1)), "c", false, None));
    commands.push(assign(
        AssignmentTarget::Client(mac(1)),
        "b",
        false,
        Some(0),
    ));
    let (state, outcomes) = run(commands);
    assert!(outcomes.iter().all(|o| o.is_ok()));
    let list = state.client_images(&mac(1));
    let order: Vec<&str> = list.images.iter().map(|a| a.image.as_str()).collect();
    assert_eq!(order, vec!["b", "c", "a"]);
    assert_eq!(list.default, Some(name("a")));
}

#[test]
fn replay_until_seq_and_time_are_prefixes() {
    let mut state = State::default();
    let mut events = vec![];
    for (i, group) in ["g1", "g2", "g3"].iter().enumerate() {
        events.extend(
            state
                .execute(&proposal(
                    10 * (i as TimeMs + 1),
                    Command::AddGroup {
                        name: name(group),
                        description: String::new(),
                    },
                ))
                .unwrap(),
        );
    }
    assert_eq!(
        replay(&events, ReplayBound::Seq(2)).unwrap().groups.len(),
        2
    );
    assert_eq!(
        replay(&events, ReplayBound::Time(10)).unwrap().groups.len(),
        1
    );
    assert_eq!(
        replay(&events, ReplayBound::Time(9)).unwrap(),
        State::default()
    );
    assert_eq!(
        replay(&events[1..], ReplayBound::Everything),
        Err(ReplayError::Gap {
            expected: 1,
            found: 2
        })
    );
}

fn any_command() -> impl Strategy<Value = Command> {
    let mac = (0u8..6).prop_map(mac);
    let small_name = prop::sample::select(vec!["a", "b", "c"]).prop_map(name);
    let target = prop_oneof![
        mac.clone().prop_map(AssignmentTarget::Client),
        small_name.clone().prop_map(AssignmentTarget::Group),
        small_name.clone().prop_map(AssignmentTarget::User),
    ];
    let mode = prop_oneof![Just(DiskMode::Persistent), Just(DiskMode::NonPersistent)];
    prop_oneof![
        (1u64..4, 0u32..4).prop_map(|(id, capacity)| register(id, capacity)),
        (1u64..4, any::<bool>())
            .prop_map(|(node_id, draining)| Command::SetNodeDraining { node_id, draining }),
        (1u64..4, any::<bool>())
            .prop_map(|(node_id, healthy)| Command::SetNodeHealth { node_id, healthy }),
        (1u64..4).prop_map(|node_id| Command::RemoveNode { node_id }),
        small_name.clone().prop_map(|name| Command::CreateImage {
            name,
            description: String::new()
        }),
        small_name
            .clone()
            .prop_map(|name| Command::RemoveImage { name }),
        small_name
            .clone()
            .prop_map(|image| Command::BeginImageVersion { image }),
        (small_name.clone(), 1u32..3).prop_map(|(image, version)| Command::CompleteImageVersion {
            image,
            version,
            manifest: Hash32::of(b"m"),
            size_bytes: 4096
        }),
        (small_name.clone(), 1u32..3)
            .prop_map(|(image, version)| Command::RetireImageVersion { image, version }),
        (
            mac.clone(),
            small_name.clone(),
            prop::option::of(small_name.clone())
        )
            .prop_map(|(mac, name, group)| Command::AddClient { mac, name, group }),
        mac.clone().prop_map(|mac| Command::RemoveClient { mac }),
        small_name.clone().prop_map(|name| Command::AddGroup {
            name,
            description: String::new()
        }),
        small_name
            .clone()
            .prop_map(|name| Command::RemoveGroup { name }),
        small_name.clone().prop_map(|name| Command::AddUser {
            name,
            password_hash: None
        }),
        small_name
            .clone()
            .prop_map(|name| Command::RemoveUser { name }),
        (
            target.clone(),
            small_name.clone(),
            mode,
            any::<bool>(),
            prop::option::of(0u32..3)
        )
            .prop_map(|(target, image, mode, default, position)| Command::Assign {
                target,
                image,
                mode,
                default,
                position
            }),
        (target, small_name.clone())
            .prop_map(|(target, image)| Command::Unassign { target, image }),
        (
            mac.clone(),
            small_name.clone(),
            prop::option::of(small_name)
        )
            .prop_map(|(mac, image, user)| Command::BeginBoot { mac, image, user }),
        prop::collection::vec((1u8..4, mac.clone(), 0i64..5_000), 1..4).prop_map(|leases| {
            Command::CommitLeases {
                leases: leases
                    .into_iter()
                    .map(|(ip, mac, expires_ms)| LeaseRequest {
                        ip: Ipv4Addr::new(10, 0, 0, ip),
                        mac,
                        expires_ms,
                    })
                    .collect(),
            }
        }),
        mac.clone().prop_map(|mac| Command::ReleaseLease { mac }),
        (mac.clone(), 1u64..6)
            .prop_map(|(mac, generation)| Command::DropStandby { mac, generation }),
        (mac.clone(), 1u64..6).prop_map(|(mac, generation)| Command::FailOver { mac, generation }),
        (mac.clone(), 1u64..6)
            .prop_map(|(mac, generation)| Command::AssignStandby { mac, generation }),
        (mac, 1u64..6, 1u64..4).prop_map(|(mac, generation, standby)| {
            Command::MarkStandbyInSync {
                mac,
                generation,
                standby,
            }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_commands_keep_replay_equal_to_live_state(commands in prop::collection::vec(any_command(), 1..120)) {
        let (state, _) = run(commands);
        // Invariants of the projection itself.
        for session in state.boot_sessions.values() {
            prop_assert!(session.standby != Some(session.primary));
            prop_assert!(session.standby.is_some() || session.standby_copy == StandbyCopy::InSync);
            // A persistent session's primary always holds a current copy, and so does an
            // in-sync standby: no acknowledged write can be on a copy nobody may serve.
            let copies = state
                .clients
                .get(&session.mac)
                .and_then(|client| client.layers.get(&session.image));
            if let (DiskMode::Persistent, Some(copies)) = (session.mode, copies) {
                prop_assert!(copies.in_sync.contains(&session.primary), "{session:?} {copies:?}");
                if session.standby_copy == StandbyCopy::InSync {
                    if let Some(standby) = session.standby {
                        prop_assert!(copies.in_sync.contains(&standby));
                    }
                }
            }
        }
        for client in state.clients.values() {
            for copies in client.layers.values() {
                prop_assert!(copies.homes.len() <= LAYER_HOMES_MAX);
                prop_assert!(copies.in_sync.is_subset(&copies.homes));
            }
        }
        let mut macs: Vec<Mac> = state.leases.values().map(|l| l.mac).collect();
        macs.sort();
        let before = macs.len();
        macs.dedup();
        prop_assert_eq!(before, macs.len(), "a MAC holds two leases");
    }

    #[test]
    fn events_survive_the_codec(commands in prop::collection::vec(any_command(), 1..60)) {
        let mut state = State::default();
        for (i, command) in commands.into_iter().enumerate() {
            if let Ok(events) = state.execute(&proposal(i as TimeMs, command)) {
                for event in events {
                    let bytes = crate::codec::encode(&event).unwrap();
                    prop_assert_eq!(crate::codec::decode::<Event>(&bytes).unwrap(), event.clone());
                    let json = serde_json::to_string(&event).unwrap();
                    prop_assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
                }
            }
        }
    }
}
