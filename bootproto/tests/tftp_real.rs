//! Real-socket TFTP tests on 127.0.0.1: curl (a real client, when installed; required under
//! `CAIRN_SLOW_TESTS=1`) downloads files with and without blksize/tsize; a small hand-written
//! client checks windowsize (RFC 7440), ERROR codes for writes, unknown opcodes, paths outside
//! the root and symlinks out, and the transfer limit.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cairn_bootproto::testing::missing_prerequisite;
use cairn_bootproto::tftp::wire::{self, Packet};
use cairn_bootproto::tftp::{TftpConfig, TftpServer};
use tokio::net::UdpSocket;

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

async fn start(root: &Path, configure: impl FnOnce(&mut TftpConfig)) -> SocketAddr {
    let mut config = TftpConfig::new("127.0.0.1:0".parse().unwrap(), root);
    configure(&mut config);
    let server = TftpServer::bind(config).await.unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.run());
    addr
}

fn fixture() -> (tempfile::TempDir, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("undionly.kpxe"), content(70_001)).unwrap();
    std::fs::write(root.path().join("exact.bin"), content(1024)).unwrap();
    std::fs::create_dir(root.path().join("sub")).unwrap();
    std::fs::write(root.path().join("sub/inner.txt"), b"inner").unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("escape")).unwrap();
    std::os::unix::fs::symlink(
        root.path().join("sub/inner.txt"),
        root.path().join("inside-link"),
    )
    .unwrap();
    (root, outside)
}

/// Sends a raw request and returns the first reply.
async fn ask(server: SocketAddr, request: &[u8]) -> Packet {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(request, server).await.unwrap();
    let mut buffer = vec![0u8; 70_000];
    let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buffer))
        .await
        .unwrap()
        .unwrap();
    wire::parse(&buffer[..len]).unwrap()
}

fn rrq(filename: &str, options: &[(&str, &str)]) -> Vec<u8> {
    wire::encode(&Packet::Rrq {
        filename: filename.into(),
        mode: "octet".into(),
        options: options
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    })
}

fn error_code(packet: Packet) -> u16 {
    match packet {
        Packet::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_downloads_files() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .map(|o| !String::from_utf8_lossy(&o.stdout).contains("tftp"))
        .unwrap_or(true)
    {
        missing_prerequisite("curl with tftp support is not installed (Debian package curl)");
        return;
    }
    let (root, _outside) = fixture();
    let server = start(root.path(), |_| {}).await;
    let out = tempfile::tempdir().unwrap();
    for (name, extra) in [
        ("undionly.kpxe", vec![]),
        ("undionly.kpxe", vec!["--tftp-blksize", "1468"]),
        ("exact.bin", vec!["--tftp-blksize", "512"]),
        ("sub/inner.txt", vec![]),
        ("inside-link", vec![]),
    ] {
        let target = out.path().join("got");
        let url = format!("tftp://{server}/{name}");
        let status = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "-o"])
            .arg(&target)
            .args(&extra)
            .arg(&url)
            .status()
            .await
            .unwrap();
        assert!(status.success(), "curl {url} {extra:?} failed: {status}");
        let expected = std::fs::read(root.path().join(name)).unwrap();
        assert_eq!(
            std::fs::read(&target).unwrap(),
            expected,
            "{name} {extra:?}"
        );
    }
    let status = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "/dev/null"])
        .arg(format!("tftp://{server}/missing"))
        .status()
        .await
        .unwrap();
    assert!(!status.success(), "a missing file must fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windowsize_transfer_with_own_client() {
    let (root, _outside) = fixture();
    let server = start(root.path(), |_| {}).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(
            &rrq(
                "undionly.kpxe",
                &[("blksize", "1024"), ("windowsize", "4"), ("tsize", "0")],
            ),
            server,
        )
        .await
        .unwrap();
    let mut buffer = vec![0u8; 2048];
    let (len, tid) = socket.recv_from(&mut buffer).await.unwrap();
    assert_ne!(tid, server, "the transfer uses a new port (TID)");
    assert_eq!(
        wire::parse(&buffer[..len]).unwrap(),
        Packet::Oack {
            options: vec![
                ("blksize".into(), "1024".into()),
                ("windowsize".into(), "4".into()),
                ("tsize".into(), "70001".into())
            ]
        }
    );
    socket
        .send_to(&wire::encode(&Packet::Ack { block: 0 }), tid)
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut expected_block: u16 = 1;
    loop {
        let (len, from) =
            tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buffer))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(from, tid);
        let Packet::Data { block, data } = wire::parse(&buffer[..len]).unwrap() else {
            panic!("expected data")
        };
        assert_eq!(block, expected_block);
        received.extend_from_slice(&data);
        let last = data.len() < 1024;
        if block % 4 == 0 || last {
            socket
                .send_to(&wire::encode(&Packet::Ack { block }), tid)
                .await
                .unwrap();
        }
        if last {
            break;
        }
        expected_block += 1;
    }
    assert_eq!(received, content(70_001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_errors() {
    let (root, _outside) = fixture();
    let server = start(root.path(), |_| {}).await;
    assert_eq!(error_code(ask(server, &rrq("missing", &[])).await), 1);
    assert_eq!(error_code(ask(server, &rrq("../etc/passwd", &[])).await), 2);
    assert_eq!(error_code(ask(server, &rrq("/etc/passwd", &[])).await), 2);
    assert_eq!(
        error_code(ask(server, &rrq("escape", &[])).await),
        2,
        "symlink out of the root"
    );
    assert_eq!(
        error_code(ask(server, &rrq("sub", &[])).await),
        2,
        "a directory"
    );
    let wrq = wire::encode(&Packet::Wrq {
        filename: "x".into(),
        mode: "octet".into(),
        options: vec![],
    });
    assert_eq!(error_code(ask(server, &wrq).await), 4);
    assert_eq!(
        error_code(ask(server, &[0, 9, 1, 2, 3]).await),
        4,
        "unknown opcode"
    );
    assert_eq!(
        error_code(ask(server, &rrq("exact.bin", &[("blksize", "2")])).await),
        8
    );
    assert_eq!(
        error_code(ask(server, &wire::encode(&Packet::Ack { block: 1 })).await),
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced() {
    let (root, _outside) = fixture();
    let server = start(root.path(), |c| {
        c.transfers_max = 1;
        c.limits.file_size_bytes_max = 2000;
        c.limits.timeout_ms = 300;
        c.limits.retries_max = 1;
    })
    .await;
    assert_eq!(
        error_code(ask(server, &rrq("undionly.kpxe", &[])).await),
        0,
        "file above the size limit"
    );
    // Hold the only slot with a transfer we never acknowledge. The refused transfer above frees
    // its slot just after its error is sent, so the first try may still be told "busy".
    let holder = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buffer = vec![0u8; 2048];
    let mut holding = false;
    for _ in 0..40 {
        holder
            .send_to(&rrq("exact.bin", &[]), server)
            .await
            .unwrap();
        let (len, _) = holder.recv_from(&mut buffer).await.unwrap();
        if matches!(
            wire::parse(&buffer[..len]).unwrap(),
            Packet::Data { block: 1, .. }
        ) {
            holding = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(holding, "the free slot was never given out");
    assert_eq!(
        error_code(ask(server, &rrq("exact.bin", &[])).await),
        0,
        "busy while the slot is held"
    );
    // The unacknowledged transfer retransmits once, then gives up and frees the slot.
    let (len, _) = holder.recv_from(&mut buffer).await.unwrap();
    assert!(
        matches!(
            wire::parse(&buffer[..len]).unwrap(),
            Packet::Data { block: 1, .. }
        ),
        "retransmission"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(matches!(
        ask(server, &rrq("exact.bin", &[])).await,
        Packet::Data { block: 1, .. }
    ));
}
