//! Cairn's iSCSI target against tgt (Debian's user-space target) on the same image, same run:
//! 64 KiB sequential reads (MB/s) and 4 KiB random reads (IOPS) with libiscsi's `iscsi-perf`,
//! 32 commands in flight, plus 64 KiB sequential writes with a small pipelined initiator written
//! here (this `iscsi-perf` only reads). Cairn is measured three times: serving the plain file,
//! and serving a volume (what clients use: the image imported into the BLAKE3 chunk store as the
//! base, plus a 4 KiB writable layer; reads and writes go to two volumes over the same base so
//! the reads measure the base) with the store's default verified-chunk cache (an eighth of the
//! memory available, see `chunks::default_cache_bytes`; printed), and with a 256 MiB cache, a
//! quarter of the 1 GiB image, so most reads come from disk and are verified (the path a store
//! larger than memory takes). Rounds rotate the order of the four targets and the median is
//! kept, because the machine is shared. Prints each figure, the
//! ratios, and each Cairn process's memory per session (resident set growth per idle session,
//! and peak during the load).
//!
//! `cargo bench -p cairn-blockstore --bench iscsi_vs_tgt`; `BENCH_SECONDS` (default 5) and
//! `BENCH_ROUNDS` (default 3) tune it; `BENCH_CAIRN_ARGS` sets extra arguments of
//! `cairn-iscsi-file` serving the file (default `--inline-io`), `BENCH_VOLUME_ARGS` those of the
//! volume server (default none: the node's configuration, device calls other than READs on the
//! blocking pool); `BENCH_CAIRN_BIN` runs another build of `cairn-iscsi-file` (an older
//! commit's, for before/after figures). Needs tgt and libiscsi-bin; prints why and exits 0 when they are missing.
//! Goals (not asserted): reads >= 1.5x tgt, writes >= 1.0x tgt, through the volume.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_blockstore::iscsi::text::push_pair;
use cairn_blockstore::iscsi::wire::{
    be32, DataOut, Decoded, FrameDecoder, InitiatorPdu, LoginRequest, Pdu, ScsiCommand, TAG_NONE,
};

const IMAGE_BYTES: u64 = 1 << 30;
const INITIATOR: &str = "iqn.2026-11.org.cairn:bench";

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Tgt {
    child: Child,
    control: String,
}

impl Drop for Tgt {
    fn drop(&mut self) {
        let _ = Command::new("tgtadm")
            .args([
                "-C",
                &self.control,
                "--lld",
                "iscsi",
                "--op",
                "delete",
                "--force",
                "--mode",
                "target",
                "--tid",
                "1",
            ])
            .output();
        let _ = Command::new("tgtadm")
            .args(["-C", &self.control, "--op", "delete", "--mode", "system"])
            .output();
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same steps as shared/peers/tgt-reference.sh: tgtd in the foreground with its own control
/// port, one target, the image as LUN 1, open to all initiators.
fn start_tgt(image: &str, port: u16, iqn: &str) -> Tgt {
    let control = (port % 1000 + 100).to_string();
    let child = Command::new("tgtd")
        .args([
            "-f",
            "-C",
            &control,
            "--iscsi",
            &format!("portal=127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tgtd");
    let tgt = Tgt {
        child,
        control: control.clone(),
    };
    for _ in 0..50 {
        if Command::new("tgtadm")
            .args(["-C", &control, "--op", "show", "--mode", "sys"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = |args: &[&str]| {
        let out = Command::new("tgtadm")
            .args(["-C", &control])
            .args(args)
            .output()
            .expect("tgtadm");
        assert!(
            out.status.success(),
            "tgtadm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1", "-T", iqn,
    ]);
    run(&[
        "--lld",
        "iscsi",
        "--op",
        "new",
        "--mode",
        "logicalunit",
        "--tid",
        "1",
        "--lun",
        "1",
        "-b",
        image,
    ]);
    run(&[
        "--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
    ]);
    tgt
}

/// Extra `cairn-iscsi-file` arguments: `BENCH_CAIRN_ARGS`, by default `--inline-io` (the
/// served file sits in the page cache, so its calls return in microseconds; see
/// `Target::with_inline_io`). `BENCH_CAIRN_ARGS=""` measures the blocking-pool shell that
/// volumes use.
fn cairn_args() -> String {
    std::env::var("BENCH_CAIRN_ARGS").unwrap_or_else(|_| "--inline-io".to_string())
}

struct Cairn(Child);

impl Drop for Cairn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn volume_args() -> String {
    std::env::var("BENCH_VOLUME_ARGS").unwrap_or_default()
}

fn start_cairn(image: &str, port: u16, iqns: &[&str], extra: &[String]) -> Cairn {
    // BENCH_CAIRN_BIN: another build of cairn-iscsi-file (an older commit, for before/after).
    let binary = std::env::var("BENCH_CAIRN_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_cairn-iscsi-file").to_string());
    let mut child = Command::new(binary)
        .args(["--portal", &format!("127.0.0.1:{port}"), "--file", image])
        .args(iqns.iter().flat_map(|iqn| ["--iqn", iqn]))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start cairn-iscsi-file");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready");
    assert_eq!(line.trim(), "ready");
    Cairn(child)
}

/// Runs iscsi-perf and returns (IOPS, MB/s) from its "iops average N (M MB/s)" line.
fn iscsi_perf(url: &str, blocks: u32, random: bool, seconds: u64) -> (f64, f64) {
    let mut args = vec![
        "-m".to_string(),
        "32".into(),
        "-b".into(),
        blocks.to_string(),
        "-t".into(),
        seconds.to_string(),
    ];
    if random {
        args.push("-r".into());
    }
    args.push(url.to_string());
    let out = Command::new("timeout")
        .arg((seconds + 20).to_string())
        .arg("iscsi-perf")
        .args(&args)
        .output()
        .expect("iscsi-perf");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    let line = text
        .lines()
        .rfind(|l| l.starts_with("iops average"))
        .unwrap_or("");
    let nums: Vec<f64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    let iops = nums.first().copied().unwrap_or(0.0);
    // Compute MB/s from IOPS (iscsi-perf rounds down to whole MiB).
    (iops, iops * blocks as f64 * 512.0 / 1e6)
}

/// A minimal initiator session for the write load and the memory probe.
struct Session {
    stream: TcpStream,
    rx: Vec<u8>,
    decoder: FrameDecoder,
    cmd_sn: u32,
    exp_stat_sn: u32,
    /// The target's MaxRecvDataSegmentLength, FirstBurstLength, and whether unsolicited
    /// Data-Out and immediate data are allowed.
    target_mrdsl: usize,
    first_burst: usize,
    initial_r2t: bool,
    immediate_data: bool,
    /// The LUN field (SAM single-level addressing).
    lun: u64,
}

impl Session {
    fn login(port: u16, iqn: &str, isid_tail: u8) -> Session {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.set_nodelay(true).ok();
        let mut text = Vec::new();
        for (k, v) in [
            ("InitiatorName", INITIATOR),
            ("TargetName", iqn),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ] {
            push_pair(&mut text, k, v);
        }
        let mut s = Session {
            stream,
            rx: Vec::new(),
            decoder: FrameDecoder {
                header_digest: false,
                data_digest: false,
                data_segment_len_max: 1 << 24,
            },
            cmd_sn: 1,
            exp_stat_sn: 0,
            target_mrdsl: 8192,
            first_burst: 65536,
            initial_r2t: true,
            immediate_data: true,
            lun: 0,
        };
        let isid = [0x80, 0x12, 0x34, 0x56, 0x00, isid_tail];
        // Security stage, then operational.
        let req = |stage: u8, next: u8, data: Vec<u8>, exp_stat_sn: u32| {
            InitiatorPdu::Login(LoginRequest {
                transit: true,
                continue_: false,
                current_stage: stage,
                next_stage: next,
                version_max: 0,
                version_min: 0,
                isid,
                tsih: 0,
                itt: 1,
                cid: 0,
                cmd_sn: 1,
                exp_stat_sn,
                data,
            })
        };
        s.send(&req(0, 1, text, 0).to_pdu());
        let r = s.recv();
        assert_eq!(
            r.bhs[36], 0,
            "login failed: class {} detail {}",
            r.bhs[36], r.bhs[37]
        );
        s.exp_stat_sn = be32(&r.bhs, 24).wrapping_add(1);
        let mut op = Vec::new();
        for (k, v) in [
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("MaxBurstLength", "262144"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxConnections", "1"),
        ] {
            push_pair(&mut op, k, v);
        }
        s.send(&req(1, 3, op, s.exp_stat_sn).to_pdu());
        let r = s.recv();
        assert_eq!(r.bhs[36], 0, "operational login failed");
        s.exp_stat_sn = be32(&r.bhs, 24).wrapping_add(1);
        for pair in r.data.split(|b| *b == 0) {
            let t = String::from_utf8_lossy(pair);
            if let Some((k, v)) = t.split_once('=') {
                match k {
                    "MaxRecvDataSegmentLength" => s.target_mrdsl = v.parse().unwrap_or(8192),
                    "FirstBurstLength" => s.first_burst = v.parse().unwrap_or(65536),
                    "InitialR2T" => s.initial_r2t = v == "Yes",
                    "ImmediateData" => s.immediate_data = v == "Yes",
                    _ => {}
                }
            }
        }
        s
    }

    /// TEST UNIT READY until GOOD: clears the unit attention a target may hold for a new
    /// nexus (tgt reports POWER ON RESET first).
    fn clear_unit_attention(&mut self) {
        for _ in 0..5 {
            let cmd = InitiatorPdu::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: true,
                read: false,
                write: false,
                attributes: 1,
                lun: self.lun,
                itt: 0xfff0,
                expected_data_transfer_length: 0,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                cdb: vec![0; 16],
                data: Vec::new(),
            });
            self.cmd_sn = self.cmd_sn.wrapping_add(1);
            self.send(&cmd.to_pdu());
            let r = self.recv();
            self.exp_stat_sn = be32(&r.bhs, 24).wrapping_add(1);
            if r.bhs[3] == 0 {
                return;
            }
        }
    }

    fn send(&mut self, pdu: &Pdu) {
        self.stream
            .write_all(&pdu.encode(false, false))
            .expect("send");
    }

    fn recv(&mut self) -> Pdu {
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            if let Ok(Decoded::Pdu(p, used)) = self.decoder.decode(&self.rx) {
                self.rx.drain(..used);
                return p;
            }
            let n = self.stream.read(&mut chunk).expect("recv");
            assert!(n > 0, "target closed the connection");
            self.rx.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends WRITE(10) of `data` at `lba` with whatever immediate and unsolicited data the
    /// session allows; the rest waits for R2T.
    fn write10(&mut self, itt: u32, lba: u32, data: &[u8], out: &mut Vec<u8>) {
        let blocks = (data.len() / 512) as u16;
        let mut cdb = vec![0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let burst = self.first_burst.min(data.len());
        let immediate = if self.immediate_data {
            burst.min(self.target_mrdsl)
        } else {
            0
        };
        let unsolicited_end = if self.initial_r2t { immediate } else { burst };
        let cmd = InitiatorPdu::ScsiCommand(ScsiCommand {
            immediate: false,
            final_: unsolicited_end == immediate,
            read: false,
            write: true,
            attributes: 1,
            lun: self.lun,
            itt,
            expected_data_transfer_length: data.len() as u32,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb,
            data: data[..immediate].to_vec(),
        });
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        cmd.to_pdu().encode_into(out, false, false);
        self.data_out(itt, TAG_NONE, data, immediate, unsolicited_end, out);
    }

    fn data_out(&self, itt: u32, ttt: u32, data: &[u8], from: usize, to: usize, out: &mut Vec<u8>) {
        let mut at = from;
        let mut data_sn = 0;
        while at < to {
            let end = (at + self.target_mrdsl).min(to);
            InitiatorPdu::DataOut(DataOut {
                final_: end == to,
                lun: self.lun,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn,
                buffer_offset: at as u32,
                data: data[at..end].to_vec(),
            })
            .to_pdu()
            .encode_into(out, false, false);
            data_sn += 1;
            at = end;
        }
    }
}

/// 64 KiB sequential writes, 32 in flight, for `seconds`. Returns MB/s.
fn write_load(port: u16, iqn: &str, lun: u64, seconds: u64) -> f64 {
    let mut s = Session::login(port, iqn, 0x77);
    s.lun = lun << 48;
    s.clear_unit_attention();
    let data = vec![0x5au8; 65536];
    let lba_max = (IMAGE_BYTES / 512) as u32 - 128;
    let mut lba = 0u32;
    let mut itt = 0x1000u32;
    let mut in_flight = std::collections::HashMap::new();
    let mut out = Vec::new();
    for _ in 0..32 {
        in_flight.insert(itt, ());
        s.write10(itt, lba, &data, &mut out);
        itt += 1;
        lba = (lba + 128) % lba_max;
    }
    s.stream.write_all(&out).expect("send");
    let start = Instant::now();
    let mut done = 0u64;
    while !in_flight.is_empty() {
        let p = s.recv();
        match p.opcode() {
            0x21 => {
                assert_eq!(p.bhs[3], 0, "write failed with status {}", p.bhs[3]);
                s.exp_stat_sn = be32(&p.bhs, 24).wrapping_add(1);
                in_flight.remove(&p.itt());
                done += 1;
                if start.elapsed() < Duration::from_secs(seconds) {
                    out.clear();
                    in_flight.insert(itt, ());
                    s.write10(itt, lba, &data, &mut out);
                    s.stream.write_all(&out).expect("send");
                    itt = itt.wrapping_add(1);
                    lba = (lba + 128) % lba_max;
                }
            }
            0x31 => {
                let (ttt, offset, length) = (
                    be32(&p.bhs, 20),
                    be32(&p.bhs, 40) as usize,
                    be32(&p.bhs, 44) as usize,
                );
                out.clear();
                s.data_out(p.itt(), ttt, &data, offset, offset + length, &mut out);
                s.stream.write_all(&out).expect("send");
            }
            0x20 => {}
            other => panic!("unexpected pdu {other:#x} during write load"),
        }
    }
    done as f64 * 65536.0 / 1e6 / start.elapsed().as_secs_f64()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system, all threads) a process has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start after ')'.
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    ticks as f64 / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One target under test: where reads and writes go, and the process serving it.
struct Subject {
    label: &'static str,
    port: u16,
    read_iqn: String,
    read_lun: u64,
    write_iqn: String,
    write_lun: u64,
    pid: u32,
}

impl Subject {
    fn read_url(&self) -> String {
        format!(
            "iscsi://127.0.0.1:{}/{}/{}",
            self.port, self.read_iqn, self.read_lun
        )
    }
}

/// Figures of one target, one value per round.
#[derive(Default)]
struct Figures {
    sequential_mbps: Vec<f64>,
    random_iops: Vec<f64>,
    write_mbps: Vec<f64>,
    cpu_us_per_read: Vec<f64>,
    cpu_us_per_random_read: Vec<f64>,
}

/// Resident set growth per idle session (KiB), with 16 sessions logged in.
fn idle_session_kib(pid: u32, port: u16, iqn: &str) -> f64 {
    let before = rss_kib(pid, "VmRSS:");
    let idle: Vec<Session> = (0..16)
        .map(|i| Session::login(port, iqn, i as u8))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let with = rss_kib(pid, "VmRSS:");
    with.saturating_sub(before) as f64 / idle.len() as f64
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for tool in ["tgtd", "tgtadm", "iscsi-perf"] {
        if !have(tool) {
            println!(
                "iscsi_vs_tgt skipped: {tool} not found (apt-get install -y tgt libiscsi-bin)"
            );
            return;
        }
    }
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .expect("tempdir");
    let image = dir.path().join("bench.img");
    {
        // Real data, not holes: reads must come from the page cache, not the zero page.
        let mut f = std::fs::File::create(&image).expect("image");
        let mut block = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..(IMAGE_BYTES >> 20) {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).expect("fill image");
        }
        f.sync_all().ok();
    }
    let image = image.display().to_string();
    let (cairn_port, volume_port, small_cache_port, tgt_port) =
        (free_port(), free_port(), free_port(), free_port());
    let cairn_iqn = "iqn.2026-11.org.cairn:client.525400770042";
    let volume_iqns = [
        "iqn.2026-11.org.cairn:client.525400770043",
        "iqn.2026-11.org.cairn:client.525400770044",
    ];
    let small_cache_iqns = [
        "iqn.2026-11.org.cairn:client.525400770045",
        "iqn.2026-11.org.cairn:client.525400770046",
    ];
    let tgt_iqn = "iqn.2026-11.org.cairn.reference:tgt-bench";
    let split =
        |args: String| -> Vec<String> { args.split_whitespace().map(str::to_string).collect() };
    let cairn = start_cairn(&image, cairn_port, &[cairn_iqn], &split(cairn_args()));
    // Two volume servers: the store's default chunk cache (sized from the memory available), and
    // one with 256 MiB, a quarter of the image, so most reads come from disk and are verified.
    let start_volume = |port: u16, iqns: &[&str], name: &str, cache: Option<&str>| {
        let started = Instant::now();
        let mut extra = vec![
            "--volume".to_string(),
            dir.path().join(name).display().to_string(),
        ];
        if let Some(mib) = cache {
            extra.extend(["--cache-mib".to_string(), mib.to_string()]);
        }
        extra.extend(split(volume_args()));
        let server = start_cairn(&image, port, iqns, &extra);
        let resident_kib = rss_kib(server.0.id(), "VmRSS:");
        println!(
            "{name} server ready in {:.1} s (1 GiB image imported into its chunk store), resident {resident_kib} KiB",
            started.elapsed().as_secs_f64()
        );
        (server, resident_kib)
    };
    let (volume, volume_ready_kib) = start_volume(volume_port, &volume_iqns, "volume", None);
    let (small_cache, small_cache_ready_kib) = start_volume(
        small_cache_port,
        &small_cache_iqns,
        "volume-256mib",
        Some("256"),
    );
    let tgt = start_tgt(&image, tgt_port, tgt_iqn);
    let volume_subject = |label, port, iqns: &[&str; 2], pid| Subject {
        label,
        port,
        read_iqn: iqns[0].into(),
        read_lun: 0,
        write_iqn: iqns[1].into(),
        write_lun: 0,
        pid,
    };
    let subjects = [
        Subject {
            label: "cairn file",
            port: cairn_port,
            read_iqn: cairn_iqn.into(),
            read_lun: 0,
            write_iqn: cairn_iqn.into(),
            write_lun: 0,
            pid: cairn.0.id(),
        },
        volume_subject("cairn volume", volume_port, &volume_iqns, volume.0.id()),
        volume_subject(
            "cairn volume, 256 MiB",
            small_cache_port,
            &small_cache_iqns,
            small_cache.0.id(),
        ),
        Subject {
            label: "tgt",
            port: tgt_port,
            read_iqn: tgt_iqn.into(),
            read_lun: 1,
            write_iqn: tgt_iqn.into(),
            write_lun: 1,
            pid: tgt.child.id(),
        },
    ];
    let cairns = &subjects[..3];
    let ready_kib = [0, volume_ready_kib, small_cache_ready_kib];

    // Memory per session: resident set growth with 16 idle sessions.
    let idle_kib: Vec<f64> = cairns
        .iter()
        .map(|c| idle_session_kib(c.pid, c.port, &c.read_iqn))
        .collect();

    // Warm the page cache (the image file, the chunk files) and the chunk caches equally.
    for c in cairns {
        let _ = iscsi_perf(&c.read_url(), 2048, false, 2);
    }

    let mut figures: Vec<Figures> = subjects.iter().map(|_| Figures::default()).collect();
    for round in 0..rounds {
        // Rotate which target goes first each round.
        for step in 0..subjects.len() {
            let index = (round + step) % subjects.len();
            let subject = &subjects[index];
            let url = subject.read_url();
            let cpu_before = cpu_seconds(subject.pid);
            let (seq_iops, mbps) = iscsi_perf(&url, 128, false, seconds);
            let cpu_us = (cpu_seconds(subject.pid) - cpu_before) * 1e6
                / (seq_iops * seconds as f64).max(1.0);
            let cpu_before = cpu_seconds(subject.pid);
            let (iops, _) = iscsi_perf(&url, 8, true, seconds);
            let cpu_random_us =
                (cpu_seconds(subject.pid) - cpu_before) * 1e6 / (iops * seconds as f64).max(1.0);
            let wmbps = write_load(subject.port, &subject.write_iqn, subject.write_lun, seconds);
            let f = &mut figures[index];
            f.sequential_mbps.push(mbps);
            f.random_iops.push(iops);
            f.write_mbps.push(wmbps);
            f.cpu_us_per_read.push(cpu_us);
            f.cpu_us_per_random_read.push(cpu_random_us);
            println!(
                "round {round} {:20}: seq64k {mbps:8.1} MB/s  rand4k {iops:9.0} IOPS  write64k {wmbps:8.1} MB/s  cpu/64k read {cpu_us:6.1} us  cpu/4k read {cpu_random_us:5.1} us",
                subject.label
            );
        }
    }
    let peak_kib: Vec<u64> = cairns.iter().map(|c| rss_kib(c.pid, "VmHWM:")).collect();
    let m = |f: &Figures| {
        (
            median(f.sequential_mbps.clone()),
            median(f.random_iops.clone()),
            median(f.write_mbps.clone()),
            median(f.cpu_us_per_read.clone()),
            median(f.cpu_us_per_random_read.clone()),
        )
    };
    let tgt_index = subjects.len() - 1;
    let (ts, tr, tw, tcs, tcr) = m(&figures[tgt_index]);
    println!();
    println!(
        "cairn-iscsi-file arguments: file {:?}, volume {:?}",
        cairn_args(),
        volume_args()
    );
    println!(
        "default chunk cache on this machine: {} MiB (an eighth of the memory available, at least 256 MiB)",
        cairn_blockstore::chunks::default_cache_bytes() >> 20
    );
    println!("medians over {rounds} rounds of {seconds} s, 32 in flight, same image, same run:");
    println!(
        "{:<22} {:>12} {:>8} {:>12} {:>8} {:>14} {:>8} {:>14} {:>13}",
        "",
        "seq64k MB/s",
        "vs tgt",
        "rand4k IOPS",
        "vs tgt",
        "write64k MB/s",
        "vs tgt",
        "cpu/64k rd us",
        "cpu/4k rd us"
    );
    for (index, f) in figures.iter().enumerate() {
        let (cs, cr, cw, cc, ccr) = m(f);
        println!(
            "{:<22} {cs:>12.1} {:>7.2}x {cr:>12.0} {:>7.2}x {cw:>14.1} {:>7.2}x {cc:>14.1} {ccr:>13.1}",
            subjects[index].label,
            cs / ts.max(1e-9),
            cr / tr.max(1e-9),
            cw / tw.max(1e-9),
        );
    }
    for index in [1, 2] {
        let (vs, vr, vw, vcs, vcr) = m(&figures[index]);
        println!(
            "{}: seq64k {:.2}x tgt (goal 1.5x), rand4k {:.2}x (goal 1.5x), write64k {:.2}x (goal 1.0x); target CPU per read {:.2}x less than tgt's (64 KiB), {:.2}x (4 KiB), the steadier figures on a shared machine",
            subjects[index].label,
            vs / ts.max(1e-9),
            vr / tr.max(1e-9),
            vw / tw.max(1e-9),
            tcs / vcs.max(1e-9),
            tcr / vcr.max(1e-9)
        );
    }
    for (index, c) in cairns.iter().enumerate() {
        let ready = if ready_kib[index] > 0 {
            format!(", {} KiB after the import", ready_kib[index])
        } else {
            String::new()
        };
        println!(
            "{} memory: {:.0} KiB resident per idle session (16 sessions), peak resident {} KiB for the whole process{ready}",
            c.label, idle_kib[index], peak_kib[index]
        );
    }
    println!(
        "(a volume server's peak includes its chunk cache, shared by all sessions: by default at most the size printed above plus an eighth of it for leaf tables; 256 MiB and 32 MiB for the other)"
    );
}
