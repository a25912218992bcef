//! Proves that real initiators (libiscsi's CLI tools) can discover, log in to and query Cairn's
//! target, that CHAP, mutual CHAP and initiator-name ACLs admit exactly who they should, and
//! that malformed PDUs on a raw socket neither crash the target nor disturb other sessions.
//!
//! Starts `cairn-iscsi-file` on loopback ports. Tests that need libiscsi-bin print why and
//! return when its tools are missing, or fail under `CAIRN_SLOW_TESTS=1`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use cairn_blockstore::iscsi::wire::{Decoded, FrameDecoder, InitiatorPdu, LoginRequest, Pdu};

mod common;

use common::{free_port, have, missing_prerequisite, IscsiFile};

const INITIATOR: &str = "iqn.2026-11.org.cairn:test-initiator";

struct Server {
    _process: IscsiFile,
    ports: Vec<u16>,
    iqn: String,
    _dir: tempfile::TempDir,
}

fn start(extra: &[&str], portals: usize) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    let iqn = cairn_blockstore::iscsi::target_name_for_client([0x52, 0x54, 0x00, 0x77, 0x00, 0x20]);
    let ports: Vec<u16> = (0..portals).map(|_| free_port()).collect();
    let mut args: Vec<String> = Vec::new();
    for p in &ports {
        args.push("--portal".into());
        args.push(format!("127.0.0.1:{p}"));
    }
    args.extend([
        "--iqn".into(),
        iqn.clone(),
        "--file".into(),
        image.display().to_string(),
        "--size-mib".into(),
        "64".into(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Server {
        _process: IscsiFile::start(&args),
        ports,
        iqn,
        _dir: dir,
    }
}

fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg("30")
        .arg(tool)
        .args(args)
        .output()
        .expect("run tool");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn discovery_inquiry_and_capacity_on_both_portals() {
    if !have("iscsi-ls") {
        missing_prerequisite("libiscsi-bin tools not found (apt-get install -y libiscsi-bin)");
        return;
    }
    let s = start(&[], 2);
    let (ok, text) = run(
        "iscsi-ls",
        &["-s", &format!("iscsi://127.0.0.1:{}", s.ports[0])],
    );
    assert!(ok, "iscsi-ls failed: {text}");
    assert!(text.contains(&format!("Target:{}", s.iqn)), "{text}");
    for p in &s.ports {
        assert!(
            text.contains(&format!("Portal:127.0.0.1:{p},1")),
            "portal {p} not advertised: {text}"
        );
    }
    assert!(
        text.contains("Lun:0") && text.contains("DIRECT_ACCESS"),
        "{text}"
    );

    let mut ids = Vec::new();
    for p in &s.ports {
        let url = format!("iscsi://127.0.0.1:{p}/{}/0", s.iqn);
        let (ok, text) = run("iscsi-inq", &[&url]);
        assert!(ok, "{text}");
        assert!(
            text.contains("Vendor:CAIRN") && text.contains("Peripheral Device Type:DIRECT_ACCESS"),
            "{text}"
        );
        let (ok, text) = run("iscsi-inq", &["-e", "1", "-c", "0x83", &url]);
        assert!(ok, "{text}");
        ids.push(text);
        let (ok, text) = run("iscsi-readcapacity16", &[&url]);
        assert!(ok, "{text}");
        assert!(text.contains("Total size:67108864"), "{text}");
        assert!(text.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{text}");
    }
    // The device identifier is the same on both paths (multipath sees one disk).
    assert_eq!(ids[0], ids[1]);
}

#[test]
fn chap_mutual_chap_and_initiator_acl() {
    if !have("iscsi-inq") {
        missing_prerequisite("libiscsi-bin tools not found (apt-get install -y libiscsi-bin)");
        return;
    }
    let s = start(
        &[
            "--chap",
            "alice:alicesecret12",
            "--mutual-chap",
            "tgtuser:targetsecret12",
            "--initiator",
            INITIATOR,
        ],
        1,
    );
    let host = format!("127.0.0.1:{}", s.ports[0]);
    let url = |creds: &str, query: &str| format!("iscsi://{creds}{host}/{}/0{query}", s.iqn);

    let (ok, text) = run(
        "iscsi-inq",
        &["-i", INITIATOR, &url("alice%alicesecret12@", "")],
    );
    assert!(
        ok && text.contains("Vendor:CAIRN"),
        "chap login failed: {text}"
    );

    let (ok, text) = run(
        "iscsi-inq",
        &[
            "-i",
            INITIATOR,
            &url(
                "alice%alicesecret12@",
                "?target_user=tgtuser&target_password=targetsecret12",
            ),
        ],
    );
    assert!(
        ok && text.contains("Vendor:CAIRN"),
        "mutual chap login failed: {text}"
    );

    let (ok, text) = run(
        "iscsi-inq",
        &[
            "-i",
            INITIATOR,
            &url(
                "alice%alicesecret12@",
                "?target_user=tgtuser&target_password=notthesecret1",
            ),
        ],
    );
    assert!(
        !ok && text.contains("CHAP_R"),
        "initiator accepted a wrong mutual secret: {text}"
    );

    let (ok, text) = run(
        "iscsi-inq",
        &["-i", INITIATOR, &url("alice%wrongsecret99@", "")],
    );
    assert!(
        !ok && text.contains("Authentication failure"),
        "wrong secret: {text}"
    );

    let (ok, text) = run("iscsi-inq", &["-i", INITIATOR, &url("", "")]);
    assert!(
        !ok && text.contains("Authentication failure"),
        "no chap: {text}"
    );

    let (ok, text) = run(
        "iscsi-inq",
        &[
            "-i",
            "iqn.2026-11.org.cairn:someone-else",
            &url("alice%alicesecret12@", ""),
        ],
    );
    assert!(
        !ok && text.contains("Authorization failure"),
        "foreign initiator: {text}"
    );

    let (ok, text) = run(
        "iscsi-inq",
        &[&format!(
            "iscsi://{host}/iqn.2026-11.org.cairn:client.000000000000/0"
        )],
    );
    assert!(
        !ok && text.contains("Target not found"),
        "unknown target: {text}"
    );
}

fn login_pdu(iqn: &str) -> Vec<u8> {
    let mut text = Vec::new();
    for (k, v) in [
        ("InitiatorName", INITIATOR),
        ("TargetName", iqn),
        ("SessionType", "Normal"),
        ("AuthMethod", "None"),
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxRecvDataSegmentLength", "65536"),
    ] {
        cairn_blockstore::iscsi::text::push_pair(&mut text, k, v);
    }
    let req = LoginRequest {
        transit: true,
        continue_: false,
        current_stage: 0,
        next_stage: 3,
        version_max: 0,
        version_min: 0,
        isid: [0x80, 0, 0, 0, 0, 1],
        tsih: 0,
        itt: 1,
        cid: 0,
        cmd_sn: 1,
        exp_stat_sn: 0,
        data: text,
    };
    InitiatorPdu::Login(req).to_pdu().encode(false, false)
}

fn read_pdu(stream: &mut TcpStream) -> Option<Pdu> {
    let decoder = FrameDecoder {
        header_digest: false,
        data_digest: false,
        data_segment_len_max: 1 << 24,
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Decoded::Pdu(p, _)) = decoder.decode(&buf) {
            return Some(p);
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[test]
fn malformed_pdus_get_protocol_answers_and_do_not_hurt_the_target() {
    let s = start(&[], 1);
    let addr = format!("127.0.0.1:{}", s.ports[0]);
    let connect = || {
        let c = TcpStream::connect(&addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(5))).ok();
        c
    };

    // Garbage before login: the connection is closed, nothing else.
    let mut c = connect();
    c.write_all(&[0xffu8; 200]).ok();
    let _ = read_pdu(&mut c);

    // A header claiming a 16 MiB data segment during login: closed, no allocation storm.
    let mut c = connect();
    let mut header = [0u8; 48];
    header[0] = 0x43;
    header[5] = 0xff;
    header[6] = 0xff;
    header[7] = 0xff;
    c.write_all(&header).ok();
    let mut b = [0u8; 1];
    assert!(
        matches!(c.read(&mut b), Ok(0) | Err(_)),
        "oversized login pdu was not refused"
    );

    // Log in properly, then send an unknown opcode: a Reject comes back and the session lives.
    let mut c = connect();
    c.write_all(&login_pdu(&s.iqn)).expect("send login");
    let resp = read_pdu(&mut c).expect("login response");
    assert_eq!(resp.opcode(), 0x23);
    assert_eq!(resp.bhs[36], 0, "login failed with class {}", resp.bhs[36]);
    let mut bogus = Pdu::new(0x1c);
    bogus.bhs[1] = 0x80;
    bogus.set_itt(7);
    c.write_all(&bogus.encode(false, false))
        .expect("send bogus");
    let reject = read_pdu(&mut c).expect("reject");
    assert_eq!(reject.opcode(), 0x3f, "expected a Reject, got {reject:?}");
    assert_eq!(
        &reject.data[..48],
        &bogus.bhs[..],
        "the Reject carries the rejected header"
    );

    // Data-Out for a task that does not exist: Reject, session still answers a NOP.
    let data_out = InitiatorPdu::DataOut(cairn_blockstore::iscsi::wire::DataOut {
        final_: true,
        lun: 0,
        itt: 99,
        ttt: 5,
        exp_stat_sn: 0,
        data_sn: 0,
        buffer_offset: 0,
        data: vec![1; 512],
    });
    c.write_all(&data_out.to_pdu().encode(false, false))
        .expect("send data-out");
    let reject = read_pdu(&mut c).expect("reject");
    assert_eq!(reject.opcode(), 0x3f);
    let nop = InitiatorPdu::NopOut(cairn_blockstore::iscsi::wire::NopOut {
        immediate: true,
        lun: 0,
        itt: 8,
        ttt: 0xffff_ffff,
        cmd_sn: 1,
        exp_stat_sn: 0,
        data: b"ping".to_vec(),
    });
    c.write_all(&nop.to_pdu().encode(false, false))
        .expect("send nop");
    let nop_in = read_pdu(&mut c).expect("nop-in");
    assert_eq!(nop_in.opcode(), 0x20);
    assert_eq!(nop_in.itt(), 8);
    assert_eq!(nop_in.data, b"ping");

    // And a fresh connection still works.
    let mut c = connect();
    c.write_all(&login_pdu(&s.iqn)).expect("send login");
    let resp = read_pdu(&mut c).expect("login response after abuse");
    assert_eq!(resp.bhs[36], 0);
}
