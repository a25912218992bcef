//! Helpers for the PXE boot tests (`tests/tests/pxe_boot.rs`): the small bootable Linux disk,
//! the network namespaces (one per Cairn node, plus a client LAN with a bridge), real
//! `cairn node run` processes inside them, qemu, and serial-console watching.
//!
//! Topology (all private to the test, removed on drop):
//!
//! ```text
//!   ns <p>-lan: br0 192.168.77.254/24 ── tap0 (qemu)
//!                │   │   │
//!   veth ────────┘   │   └──────── ns <p>-n3: eth0 192.168.77.3
//!   ns <p>-n1: eth0 192.168.77.1   ns <p>-n2: eth0 192.168.77.2
//! ```
//!
//! Each node has a namespace of its own, as it would have a machine of its own: every node binds
//! DHCP's port 67 on its `eth0` and only the Raft leader answers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::{cairn_binary, node_logs, on_path, run_cli};

pub const SUBNET: &str = "192.168.77";
pub const LAN_ADDRESS: &str = "192.168.77.254";

/// Why this machine cannot run the PXE tests, if it cannot.
pub fn unmet_prerequisite() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root {
        return Some("needs root (network namespaces, taps, DHCP port 67)".into());
    }
    for tool in [
        "qemu-system-x86_64",
        "ip",
        "mcopy",
        "mkfs.vfat",
        "sfdisk",
        "syslinux",
        "cpio",
        "objcopy",
        "busybox",
    ] {
        if !on_path(tool) {
            return Some(format!("{tool} is not installed"));
        }
    }
    for path in [
        "/usr/lib/ipxe/undionly.kpxe",
        "/usr/lib/ipxe/ipxe.efi",
        "/usr/lib/syslinux/mbr/mbr.bin",
    ] {
        if !Path::new(path).exists() {
            return Some(format!(
                "{path} is missing (packages ipxe, syslinux-common)"
            ));
        }
    }
    if kernel_image().is_none() {
        return Some("no kernel in /boot (package linux-image-amd64)".into());
    }
    None
}

fn kernel_image() -> Option<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels.pop()
}

/// Builds a 64 MiB raw disk: MBR + one FAT16 partition holding a Debian kernel, a busybox
/// initramfs that prints `marker` on ttyS0 and powers off, syslinux (BIOS) and a unified kernel
/// image at `\EFI\BOOT\BOOTX64.EFI` (UEFI, when systemd's EFI stub is installed).
pub fn build_boot_disk(work: &Path, name: &str, marker: &str) -> anyhow::Result<PathBuf> {
    let init = PLAIN_INIT.replace("@MARKER@", marker);
    build_disk(work, name, &init, Guest::Plain)
}

/// What a disk's initramfs carries beyond busybox.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Guest {
    Plain,
    /// `iscsistart` and the kernel's iSCSI modules.
    Iscsi,
    /// What an installed Linux runs on a multipathed iSCSI disk: udev, iscsid with iscsiadm,
    /// multipathd with its checkers and prioritizers, kpartx and the device-mapper modules.
    Multipath,
}

/// What the guest of [`build_iscsi_disk`] prints.
pub mod guest {
    /// The file was on the disk at boot (followed by its contents).
    pub const FILE_PRESENT: &str = "CAIRN-FILE-PRESENT";
    pub const FILE_ABSENT: &str = "CAIRN-FILE-ABSENT";
    /// The guest wrote the file, unmounted and synced: the last line of a good boot.
    pub const FILE_WRITTEN: &str = "CAIRN-FILE-WRITTEN";
    /// Something in the guest failed (followed by what).
    pub const FAILED: &str = "CAIRN-GUEST-FAIL";
}

/// Like [`build_boot_disk`], but the booted Linux then does what an installed OS does: it reads
/// the iBFT that iPXE left, logs in to the iBFT's targets in order with open-iscsi's
/// `iscsistart` (the first that answers), mounts the FAT partition of its own disk, reports
/// whether `cairn.txt` is there ([`guest::FILE_PRESENT`] / [`guest::FILE_ABSENT`]), writes it,
/// unmounts, syncs and prints [`guest::FILE_WRITTEN`]. Needs `iscsistart` and the kernel's
/// modules in `/lib/modules`.
pub fn build_iscsi_disk(work: &Path, name: &str, marker: &str) -> anyhow::Result<PathBuf> {
    let init = ISCSI_INIT.replace("@MARKER@", marker);
    build_disk(work, name, &init, Guest::Iscsi)
}

/// What the guest of [`build_multipath_disk`] prints on its console.
pub mod multipath_guest {
    /// The workload started (followed by the number of records found on the disk at boot).
    pub const STARTED: &str = "CAIRN-WORKLOAD";
    /// One record written and fsynced: `CAIRN-REC <n> <uptime before> <uptime after>`.
    pub const RECORD: &str = "CAIRN-REC";
    /// A write or fsync failed: an I/O error reached the workload.
    pub const IO_FAILED: &str = "CAIRN-IO-FAIL";
    /// Typed on the console: read every record back from the disk (page cache dropped).
    pub const VERIFY_COMMAND: &str = "verify";
    /// Typed on the console: verify, unmount, power off.
    pub const STOP_COMMAND: &str = "stop";
    /// The answer to a verify: `CAIRN-VERIFIED <records in order from 1>`.
    pub const VERIFIED: &str = "CAIRN-VERIFIED";
    /// A record out of order or missing in the file (followed by the line).
    pub const VERIFY_BAD: &str = "CAIRN-VERIFY-BAD";
    /// Lines of the kernel log that show an I/O error above multipath (the file system or the
    /// multipath device itself), each prefixed with this.
    pub const KERNEL_ERROR: &str = "CAIRN-KERNEL-ERROR";
    /// The guest unmounted its file system and powers off.
    pub const STOPPED: &str = "CAIRN-STOPPED";
    /// The paths of the multipath device, each a SCSI disk and the address of the node its
    /// session goes to, printed when they change: `CAIRN-PATHS sda@192.168.77.1 sdb@...`.
    pub const PATHS: &str = "CAIRN-PATHS";
}

/// Like [`build_iscsi_disk`], but the booted Linux runs as an installed system on a multipathed
/// iSCSI disk would (README, "Client operating systems"): udev, iscsid logging in to every
/// target of the iBFT (the primary's path and the standby's) and polling their portals with
/// SendTargets (its discovery daemon logs in to a new standby), multipathd (`prio alua`,
/// `no_path_retry queue`) joining the paths into one device, its FAT partition mounted from
/// the multipath device. Then a workload writes numbered records, each appended and
/// fsynced, and prints each one ([`multipath_guest::RECORD`]) with the guest's uptime before and
/// after: the gap is the pause the operating system saw. Commands typed on the console check
/// every record back from the disk or stop the guest.
pub fn build_multipath_disk(work: &Path, name: &str, marker: &str) -> anyhow::Result<PathBuf> {
    let init = MULTIPATH_INIT.replace("@MARKER@", marker);
    build_disk(work, name, &init, Guest::Multipath)
}

fn build_disk(work: &Path, name: &str, init: &str, guest: Guest) -> anyhow::Result<PathBuf> {
    let kernel = kernel_image().context("no kernel in /boot")?;
    let release = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel file name")?
        .to_owned();
    let dir = work.join(format!("disk-{name}"));
    std::fs::create_dir_all(&dir)?;
    let init_path = dir.join("init");
    std::fs::write(&init_path, init)?;
    let disk = work.join(format!("{name}.img"));
    let status = Command::new("bash")
        .arg("-c")
        .arg(DISK_SCRIPT)
        .env("WORK", &dir)
        .env("DISK", &disk)
        .env("KERNEL", &kernel)
        .env("KVER", &release)
        .env("INIT", &init_path)
        .env("ISCSI", if guest == Guest::Iscsi { "1" } else { "0" })
        .env(
            "MULTIPATH",
            if guest == Guest::Multipath { "1" } else { "0" },
        )
        .env("MULTIPATH_CONF", MULTIPATH_CONF)
        .env("ISCSID_CONF", ISCSID_CONF)
        .env("LABEL", "CAIRNPXE")
        .stdout(Stdio::null())
        .status()
        .context("running the disk build script")?;
    if !status.success() {
        bail!("building the boot disk failed ({status})");
    }
    Ok(disk)
}

const PLAIN_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
exec > /dev/ttyS0 2>&1
echo "@MARKER@"
sleep 1
poweroff -f
"#;

const ISCSI_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
exec > /dev/ttyS0 2>&1
echo "@MARKER@"
fail() { echo "CAIRN-GUEST-FAIL $*"; dmesg | tail -20; sleep 1; poweroff -f; }
for m in $(cat /modules.list); do insmod /lib/modules/$m 2>/dev/null; done
F=/sys/firmware/ibft; i=0
while [ ! -d $F/ethernet0 ] && [ $i -lt 20 ]; do sleep 0.5; i=$((i+1)); done
[ -d $F/ethernet0 ] || fail "no iBFT"
MAC=$(cat $F/ethernet0/mac)
IF=$(for n in /sys/class/net/*; do [ "$(cat $n/address)" = "$MAC" ] && basename $n; done)
ip link set $IF up
ip addr add $(cat $F/ethernet0/ip-addr)/$(cat $F/ethernet0/prefix-len) dev $IF
sleep 1
# One target at a time, in the iBFT's order, with a time limit ('iscsistart -b' retries a dead
# first target forever).
rc=1
for t in $F/target*; do
  echo "CAIRN-GUEST login $(cat $t/ip-addr):$(cat $t/port) $(cat $t/target-name)"
  timeout 40 iscsistart -i "$(cat $F/initiator/initiator-name)" -t "$(cat $t/target-name)" \
    -g 1 -a "$(cat $t/ip-addr)" -p "$(cat $t/port)"; rc=$?
  [ $rc = 0 ] && break
done
[ $rc = 0 ] || fail "iscsistart rc=$rc"
i=0; while [ ! -b /dev/sda1 ] && [ $i -lt 40 ]; do sleep 0.5; i=$((i+1)); done
[ -b /dev/sda1 ] || fail "no /dev/sda1"
mkdir -p /mnt
mount -t vfat /dev/sda1 /mnt || fail "mount /dev/sda1"
if [ -f /mnt/cairn.txt ]; then echo "CAIRN-FILE-PRESENT $(cat /mnt/cairn.txt)"; else echo "CAIRN-FILE-ABSENT"; fi
echo "written at uptime $(cut -d' ' -f1 /proc/uptime)" > /mnt/cairn.txt || fail "write"
umount /mnt || fail "umount"
sync
echo "CAIRN-FILE-WRITTEN"
sleep 1
poweroff -f
"#;

/// The guest's `/etc/multipath.conf`: the README's, section "Client operating systems".
const MULTIPATH_CONF: &str = r#"defaults {
    user_friendly_names yes
    find_multipaths off
    polling_interval 1
}
devices {
    device {
        vendor "CAIRN"
        product "VOLUME"
        path_grouping_policy group_by_prio
        prio alua
        hardware_handler "1 alua"
        path_checker tur
        failback immediate
        no_path_retry queue
        fast_io_fail_tmo 1
        path_selector "service-time 0"
    }
}"#;

/// The guest's `/etc/iscsi/iscsid.conf`: the README's, section "Client operating systems".
const ISCSID_CONF: &str = r#"node.startup = manual
discovery.sendtargets.use_discoveryd = Yes
discovery.sendtargets.discoveryd_poll_inval = 2
node.session.timeo.replacement_timeout = 1
node.conn[0].timeo.login_timeout = 5
node.conn[0].timeo.logout_timeout = 5
node.conn[0].timeo.noop_out_interval = 1
node.conn[0].timeo.noop_out_timeout = 1
node.session.err_timeo.abort_timeout = 5
node.session.err_timeo.lu_reset_timeout = 10
node.session.err_timeo.tgt_reset_timeout = 10
node.session.initial_login_retry_max = 4
node.session.cmds_max = 128
node.session.queue_depth = 32"#;

const MULTIPATH_INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs run /run; mkdir -p /run/lock/iscsi /run/udev /run/multipath
exec > /dev/ttyS0 2>&1 < /dev/null
echo "@MARKER@"
fail() { echo "CAIRN-GUEST-FAIL $*"; dmesg | tail -30; sleep 1; poweroff -f; }
up() { cut -d' ' -f1 /proc/uptime; }
for m in $(cat /modules.list); do insmod /lib/modules/$m 2>/dev/null; done
/lib/systemd/systemd-udevd --daemon --resolve-names=never || fail "udevd"
udevadm trigger --type=devices --action=add
udevadm settle --timeout=30
F=/sys/firmware/ibft; i=0
while [ ! -d $F/ethernet0 ] && [ $i -lt 20 ]; do sleep 0.5; i=$((i+1)); done
[ -d $F/ethernet0 ] || fail "no iBFT"
MAC=$(cat $F/ethernet0/mac)
IF=$(for n in /sys/class/net/*; do [ "$(cat $n/address)" = "$MAC" ] && basename $n; done)
ip link set $IF up
ip addr add $(cat $F/ethernet0/ip-addr)/$(cat $F/ethernet0/prefix-len) dev $IF
sleep 1
echo "InitiatorName=$(cat $F/initiator/initiator-name)" > /etc/iscsi/initiatorname.iscsi
# Every iBFT portal as a SendTargets discovery record that iscsid's discovery daemon polls
# (iscsid.conf): it logs in to the portals the cluster lists for the disk now (a new standby).
# iscsiadm needs iscsid to make them, and iscsid starts its pollers when it starts: once more.
iscsid || fail "iscsid"
for t in $F/target*; do
  iscsiadm -m discoverydb -t st -p "$(cat $t/ip-addr):$(cat $t/port)" -o new >/dev/null \
    || echo "CAIRN-GUEST no discovery record for $(cat $t/ip-addr)"
done
kill $(pidof iscsid); i=0; while pidof iscsid >/dev/null && [ $i -lt 20 ]; do sleep 0.2; i=$((i+1)); done
# As its service runs it: in the foreground, its log (logins, recoveries, discovery) on the console.
iscsid -f &
i=0; while [ ! -S /run/iscsid.sock ] && ! iscsiadm -m session >/dev/null 2>&1 && [ $i -lt 20 ]; do sleep 0.2; i=$((i+1)); done
# Every target of the iBFT (the primary's path and the standby's) as a node record, with
# iscsid.conf's timeouts (a firmware login, 'iscsiadm -m fw -l', turns NOP-Outs off).
for t in $F/target*; do
  tn=$(cat $t/target-name); p="$(cat $t/ip-addr):$(cat $t/port)"
  iscsiadm -m node -o new -T "$tn" -p "$p" >/dev/null
  iscsiadm -m node -T "$tn" -p "$p" -l || echo "CAIRN-GUEST login to $p failed"
done
iscsiadm -m session
udevadm settle --timeout=30
# As its service runs it: in the foreground, logging to the console (errors only).
multipathd -d -s -v1 &
i=0; while [ ! -b /dev/mapper/mpatha ] && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done
[ -b /dev/mapper/mpatha ] || { ps; multipath -v2; fail "no multipath device"; }
# Both paths join the map (the standby's once multipathd has checked it).
i=0; while [ "$(multipath -ll | grep -c 'sd[a-z]')" -lt 2 ] && [ $i -lt 40 ]; do sleep 0.5; i=$((i+1)); done
multipath -ll
for s in /sys/class/iscsi_session/session*; do echo "CAIRN-GUEST $(basename $s) recovery_tmo=$(cat $s/recovery_tmo)"; done
for c in /sys/class/iscsi_connection/connection*; do echo "CAIRN-GUEST $(basename $c) noop interval=$(cat $c/recv_tmo) timeout=$(cat $c/ping_tmo)"; done
kpartx -a -p p /dev/mapper/mpatha || fail "kpartx"
i=0; while [ ! -b /dev/mapper/mpathap1 ] && [ $i -lt 20 ]; do sleep 0.5; i=$((i+1)); done
mkdir -p /mnt
mount -t vfat /dev/mapper/mpathap1 /mnt || fail "mount /dev/mapper/mpathap1"
R=/mnt/records.txt
verify() {
  sync; echo 3 > /proc/sys/vm/drop_caches
  k=0
  while read -r w num; do
    k=$((k+1))
    [ "$w $num" = "record $k" ] || { echo "CAIRN-VERIFY-BAD line $k: $w $num"; break; }
  done < $R
  dmesg | grep -E 'dm-[0-9]|FAT-fs' | grep -iE 'error|fail' | sed 's/^/CAIRN-KERNEL-ERROR /'
  echo "CAIRN-VERIFIED $k"
}
n=0; [ -f $R ] && n=$(wc -l < $R)
# The kernel's log of the boot (the standby path's refused reads are in it), then a clean one.
dmesg -c | tail -40
# Commands typed on the console, read whole lines at a time (a read with a timeout would take
# a line apart).
( while read -r line; do
    case "$line" in *verify*) touch /run/verify ;; *stop*) touch /run/stop ;; esac
  done ) < /dev/ttyS0 &
DM=$(basename "$(readlink -f /dev/mapper/mpatha)")
paths_were=
echo "CAIRN-WORKLOAD $n"
while :; do
  n=$((n+1)); t0=$(up)
  echo "record $n" | dd of=$R oflag=append conv=notrunc,fsync 2>/dev/null || echo "CAIRN-IO-FAIL record $n"
  echo "CAIRN-REC $n $t0 $(up)"
  # The multipath device's paths, each with its node's address, when they change (no fork
  # per record while they do not).
  paths=; for p in /sys/block/$DM/slaves/*; do paths="$paths ${p##*/}"; done
  if [ "$paths" != "$paths_were" ]; then
    paths_were=$paths; shown=
    for s in $paths; do
      d=$(readlink -f /sys/block/$s/device); d=${d%/target*}; sn=${d##*/session}
      shown="$shown $s@$(cat /sys/class/iscsi_connection/connection$sn:0/persistent_address 2>/dev/null)"
    done
    echo "CAIRN-PATHS$shown"
  fi
  [ -e /run/verify ] && { rm /run/verify; verify; }
  if [ -e /run/stop ]; then
    verify; umount /mnt; sync; multipath -ll; echo "CAIRN-STOPPED"; sleep 1; poweroff -f
  fi
  sleep 0.05
done
"#;

/// The disk build, as shell: it strings together mkfs, mtools, syslinux and objcopy.
const DISK_SCRIPT: &str = r#"
set -euo pipefail
R=$WORK/root
rm -rf "$R"; mkdir -p $R/bin $R/sbin $R/proc $R/sys $R/dev $R/etc/iscsi $R/run $R/tmp $R/var/lock $R/lib/modules
cp "$(command -v busybox)" $R/bin/busybox
for a in sh mount umount echo sleep poweroff cat insmod ip timeout dd dmesg tail basename \
         mkdir sync cut; do
  ln -sf busybox $R/bin/$a
done
cp "$INIT" $R/init
chmod +x $R/init
# The kernel modules named, with what they depend on, in load order (/modules.list).
copy_modules() {
  for m in "$@"; do modprobe -S "$KVER" --show-depends $m; done \
    | awk '$1=="insmod"{print $2}' | awk '!seen[$0]++' > $R/modules.list
  while read -r m; do cp "$m" $R/lib/modules/; done < $R/modules.list
  sed -i 's|.*/||' $R/modules.list
}
if [ "$ISCSI" = 1 ]; then
  copy_modules e1000 crc32c_generic iscsi_tcp iscsi_ibft sd_mod vfat nls_cp437 nls_iso8859_1 \
    nls_utf8 nls_ascii
  cp "$(command -v iscsistart)" $R/sbin/
  for lib in $(ldd "$(command -v iscsistart)" | grep -oE '/[^ ]+'); do
    mkdir -p $R$(dirname $lib); cp -L $lib $R$lib
  done
fi
if [ "$MULTIPATH" = 1 ]; then
  for a in grep sed awk wc seq ls ps kill tr head pidof readlink; do ln -sf busybox $R/bin/$a; done
  copy_modules e1000 virtio_pci virtio_net crc32c_generic iscsi_tcp iscsi_ibft sd_mod \
    scsi_dh_alua dm_mod dm_multipath dm_service_time dm_round_robin vfat nls_cp437 \
    nls_iso8859_1 nls_utf8 nls_ascii
  bins="/usr/sbin/iscsid /usr/sbin/iscsiadm /sbin/multipathd /sbin/multipath /sbin/kpartx
        /usr/sbin/dmsetup /lib/systemd/systemd-udevd /bin/udevadm /lib/udev/scsi_id"
  mkdir -p $R/usr/sbin $R/lib/systemd $R/lib/udev/rules.d $R/lib/multipath $R/etc/multipath \
           $R/etc/iscsi/nodes $R/etc/iscsi/send_targets $R/etc/iscsi/ifaces $R/run/lock/iscsi \
           $R/etc/udev
  for b in $bins; do
    mkdir -p $R$(dirname $b); cp -L $b $R$b
  done
  # As on a merged-/usr system: udev's rules run /sbin/dmsetup.
  for b in $R/usr/sbin/*; do [ -e $R/sbin/$(basename $b) ] || ln -s /usr/sbin/$(basename $b) $R/sbin/; done
  cp -L /lib/multipath/*.so $R/lib/multipath/
  # glibc loads it for pthread_cancel, which multipathd uses.
  mkdir -p $R/lib/x86_64-linux-gnu; cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 $R/lib/x86_64-linux-gnu/
  for f in $bins /lib/multipath/*.so; do
    for lib in $(ldd "$f" | grep -oE '/[^ ]+'); do
      [ -e $R$lib ] || { mkdir -p $R$(dirname $lib); cp -L $lib $R$lib; }
    done
  done
  for r in 50-udev-default 55-dm 56-dm-mpath 60-block 60-persistent-storage \
           60-persistent-storage-dm 60-multipath 95-dm-notify; do
    cp /lib/udev/rules.d/$r.rules $R/lib/udev/rules.d/
  done
  printf 'root:x:0:0:root:/:/bin/sh\n' > $R/etc/passwd
  printf 'root:x:0:\ndisk:x:6:\ntty:x:5:\nkmem:x:15:\ndialout:x:20:\ncdrom:x:24:\ntape:x:26:\naudio:x:29:\nvideo:x:44:\ninput:x:105:\nkvm:x:106:\nrender:x:107:\nsgx:x:108:\n' > $R/etc/group
  printf '%s\n' "$MULTIPATH_CONF" > $R/etc/multipath.conf
  printf '%s\n' "$ISCSID_CONF" > $R/etc/iscsi/iscsid.conf
fi
(cd $R && find . | cpio -o -H newc --quiet | gzip -1) > $WORK/initrd.gz
P=$WORK/part.img
rm -f $P "$DISK"
truncate -s 63M $P
mkfs.vfat -F 16 -n "$LABEL" -h 2048 $P >/dev/null
printf 'SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  INITRD initrd.gz\n  APPEND console=ttyS0,115200 quiet loglevel=3 panic=-1\n' > $WORK/syslinux.cfg
mcopy -i $P "$KERNEL" ::vmlinuz
mcopy -i $P $WORK/initrd.gz ::initrd.gz
mcopy -i $P $WORK/syslinux.cfg ::syslinux.cfg
syslinux --install $P
STUB=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
if [ -f $STUB ]; then
  echo -n "console=ttyS0,115200 quiet loglevel=3 panic=-1" > $WORK/cmdline.txt
  objcopy --add-section .osrel=/usr/lib/os-release --change-section-vma .osrel=0x20000 \
    --add-section .cmdline=$WORK/cmdline.txt --change-section-vma .cmdline=0x30000 \
    --add-section .linux="$KERNEL" --change-section-vma .linux=0x2000000 \
    --add-section .initrd=$WORK/initrd.gz --change-section-vma .initrd=0x3000000 \
    $STUB $WORK/bootx64.efi
  mmd -i $P ::EFI ::EFI/BOOT
  mcopy -i $P $WORK/bootx64.efi ::EFI/BOOT/BOOTX64.EFI
fi
truncate -s 64M "$DISK"
printf 'label: dos\nstart=2048, type=6, bootable\n' | sfdisk -q "$DISK"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$DISK" bs=440 count=1 conv=notrunc status=none
dd if=$P of="$DISK" bs=1M seek=1 conv=notrunc status=none
rm -rf $P $R $WORK/bootx64.efi
"#;

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The namespaces and links of one test; deleted on drop.
pub struct Lab {
    pub prefix: String,
    pub nodes: u8,
}

impl Lab {
    /// Creates `<prefix>-lan` (bridge, tap0, an address for the CLI) and `<prefix>-n<i>` for
    /// nodes 1..=nodes, each with `eth0` = 192.168.77.<i> on the bridge.
    pub fn create(nodes: u8) -> anyhow::Result<Lab> {
        let prefix = format!("cpxe{}", std::process::id() % 100_000);
        let lab = Lab { prefix, nodes };
        let lan = lab.lan();
        run("ip", &["netns", "add", &lan])?;
        let ip_lan = |args: &[&str]| {
            let mut all = vec!["-n", lan.as_str()];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        ip_lan(&["link", "set", "lo", "up"])?;
        ip_lan(&["link", "add", "br0", "type", "bridge"])?;
        // No STP listening delay: ports forward at once.
        ip_lan(&["link", "set", "br0", "type", "bridge", "forward_delay", "0"])?;
        ip_lan(&["link", "set", "br0", "up"])?;
        ip_lan(&["addr", "add", &format!("{LAN_ADDRESS}/24"), "dev", "br0"])?;
        ip_lan(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ip_lan(&["link", "set", "tap0", "master", "br0"])?;
        ip_lan(&["link", "set", "tap0", "up"])?;
        for id in 1..=nodes {
            let ns = lab.node_ns(id);
            run("ip", &["netns", "add", &ns])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            // Created in the node's namespace, the peer end moved to the LAN.
            let peer = format!("vn{id}");
            run(
                "ip",
                &[
                    "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer,
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", &peer, "netns", &lan])?;
            ip_lan(&["link", "set", &peer, "master", "br0"])?;
            ip_lan(&["link", "set", &peer, "up"])?;
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv6.conf.eth0.accept_dad=0",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{SUBNET}.{id}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(lab)
    }

    pub fn lan(&self) -> String {
        format!("{}-lan", self.prefix)
    }

    pub fn node_ns(&self, id: u8) -> String {
        format!("{}-n{id}", self.prefix)
    }

    pub fn node_address(&self, id: u8) -> String {
        format!("{SUBNET}.{id}")
    }

    /// Cuts node `id` off the LAN (its link goes down) or puts it back.
    pub fn set_node_link(&self, id: u8, up: bool) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "-n",
                &self.lan(),
                "link",
                "set",
                &format!("vn{id}"),
                if up { "up" } else { "down" },
            ],
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for id in 1..=self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.node_ns(id)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.lan()])
            .status();
    }
}

/// One `cairn node run` in its namespace.
pub struct LabNode {
    pub id: u8,
    pub data_dir: PathBuf,
    child: Option<Child>,
    /// SIGSTOPped ([`LabNode::pause`]): running, but the CLI does not ask it.
    paused: bool,
}

impl LabNode {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGSTOP: a hung node, whose connections stay open and say nothing.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal("STOP")?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT after [`LabNode::pause`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal("CONT")?;
        self.paused = false;
        Ok(())
    }

    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("the node is not running")?;
        crate::signal(child.id(), name)
    }

    /// SIGKILL (a power loss of the process).
    pub fn kill(&mut self) {
        self.paused = false;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LabNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How the lab's nodes take part in DHCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabDhcp {
    /// Cairn is the LAN's DHCP server (pool .100-.150, leases through Raft).
    Full,
    /// Cairn answers only PXE clients (ports 67 and 4011) beside another DHCP server, such as
    /// [`Dnsmasq`]; unknown machines are answered too, and registered into group `guests`.
    Proxy,
}

/// Three (or more) real nodes in a [`Lab`], with DHCP, TFTP and RA on every node.
pub struct LabCluster {
    pub lab: Lab,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<LabNode>,
    pub cli_config: PathBuf,
    pub dhcp: LabDhcp,
}

impl LabCluster {
    pub fn start(size: u8) -> anyhow::Result<LabCluster> {
        let lab = Lab::create(size)?;
        let dir = tempfile::Builder::new().prefix("cairn-pxe").tempdir()?;
        let cli_config = dir.path().join("cli.toml");
        let nodes = (1..=size)
            .map(|id| LabNode {
                id,
                data_dir: dir.path().join(format!("node{id}")),
                child: None,
                paused: false,
            })
            .collect();
        let mut cluster = LabCluster {
            lab,
            dir,
            nodes,
            cli_config,
            dhcp: LabDhcp::Full,
        };
        let first = cluster.nodes[0].data_dir.clone();
        let address = cluster.lab.node_address(1);
        cluster.cli_ok_in(
            &cluster.lab.node_ns(1),
            &[
                "cluster",
                "init",
                "--node-id",
                "1",
                "--address",
                &address,
                "--data-dir",
                first.to_str().context("utf-8 path")?,
            ],
        )?;
        cluster.configure_boot(1)?;
        cluster.start_node(1)?;
        cluster.wait_for(Duration::from_secs(30), |status| status["leader"].is_u64())?;
        for id in 2..=size {
            let token = cluster.cli_json(&["cluster", "join-token"])?["token"]
                .as_str()
                .context("join token")?
                .to_string();
            let data_dir = cluster.nodes[usize::from(id) - 1].data_dir.clone();
            let server = format!("https://{}:7400", cluster.lab.node_address(1));
            let address = cluster.lab.node_address(id);
            cluster.cli_ok_in(
                &cluster.lab.node_ns(id),
                &[
                    "cluster",
                    "join",
                    "--server",
                    &server,
                    "--join-token",
                    &token,
                    "--node-id",
                    &id.to_string(),
                    "--address",
                    &address,
                    "--data-dir",
                    data_dir.to_str().context("utf-8 path")?,
                ],
            )?;
            cluster.configure_boot(id)?;
            cluster.start_node(id)?;
        }
        cluster.wait_all_voters()?;
        Ok(cluster)
    }

    fn wait_all_voters(&self) -> anyhow::Result<()> {
        let voters = self.nodes.len();
        self.wait_for(Duration::from_secs(60), |status| {
            status["leader"].is_u64()
                && status["nodes"].as_array().is_some_and(|nodes| {
                    nodes.iter().filter(|n| n["raft_role"] == "voter").count() == voters
                })
        })?;
        Ok(())
    }

    /// Stops every node, switches their DHCP mode and starts them again.
    pub fn restart_with_dhcp(&mut self, dhcp: LabDhcp) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            node.kill();
        }
        self.dhcp = dhcp;
        for id in 1..=self.lab.nodes {
            self.configure_boot(id)?;
            self.start_node(id)?;
        }
        self.wait_all_voters()
    }

    /// Replaces the `[boot]` part of the node's `node.toml` with DHCP (as `self.dhcp` says) on
    /// `eth0`.
    fn configure_boot(&self, id: u8) -> anyhow::Result<()> {
        let path = self.nodes[usize::from(id) - 1].data_dir.join("node.toml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut kept = String::new();
        let mut in_boot = false;
        for line in text.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with('[') {
                in_boot = trimmed.starts_with("[boot") || trimmed.starts_with("[[boot");
                if !in_boot {
                    bail!("{} has a table besides [boot]: {trimmed}", path.display());
                }
            }
            if !in_boot {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        match self.dhcp {
            LabDhcp::Full => kept.push_str(&format!(
                "\n[boot]\ndhcp_mode = \"full\"\ninterface = \"eth0\"\nra = true\n\n[[boot.pools]]\nsubnet = \"{SUBNET}.0\"\nprefix_len = 24\nrange_first = \"{SUBNET}.100\"\nrange_last = \"{SUBNET}.150\"\nlease_secs = 600\n"
            )),
            // Unknown machines are answered and registered into group `guests`.
            LabDhcp::Proxy => kept.push_str(
                "\n[boot]\ndhcp_mode = \"proxy\"\ninterface = \"eth0\"\nra = true\nunknown_clients = \"answer\"\nunknown_group = \"guests\"\n",
            ),
        }
        std::fs::write(&path, kept)?;
        Ok(())
    }

    pub fn start_node(&mut self, id: u8) -> anyhow::Result<()> {
        let ns = self.lab.node_ns(id);
        let log_path = self.dir.path().join(format!("node{id}.log"));
        let node = &mut self.nodes[usize::from(id) - 1];
        assert!(node.child.is_none(), "node {id} already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        // `ip netns exec` execs the command: the child's pid is the node's.
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(cairn_binary())
            .args(["node", "run", "--data-dir"])
            .arg(&node.data_dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning cairn node run")?;
        node.child = Some(child);
        Ok(())
    }

    pub fn node_mut(&mut self, id: u64) -> &mut LabNode {
        &mut self.nodes[id as usize - 1]
    }

    /// Runs the CLI in namespace `ns` (default: the LAN).
    pub fn cli_in(
        &self,
        ns: &str,
        server: Option<&str>,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<(bool, String, String)> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(cairn_binary());
        run_cli(command, &self.cli_config, server, args, input)
    }

    fn cli_ok_in(&self, ns: &str, args: &[&str]) -> anyhow::Result<String> {
        let (ok, stdout, stderr) = self.cli_in(ns, None, args, None)?;
        if !ok {
            bail!("cairn {} failed: {stderr}", args.join(" "));
        }
        Ok(stdout)
    }

    /// Runs the CLI from the LAN against the first running node.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        self.cli_ok_with_input(args, None)
    }

    /// As [`LabCluster::cli_ok`], with `input` on the CLI's standard input.
    pub fn cli_ok_with_input(&self, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
        let mut last = String::new();
        for node in self.nodes.iter().filter(|n| n.is_running() && !n.paused) {
            let server = format!("https://{}:7400", self.lab.node_address(node.id));
            let (ok, stdout, stderr) = self.cli_in(&self.lab.lan(), Some(&server), args, input)?;
            if ok {
                return Ok(stdout);
            }
            last = stderr;
            // A refusal is an answer; only an unreachable node is worth trying another for.
            if !last.contains("connect")
                && !last.contains("unreachable")
                && !last.contains("timed out")
            {
                break;
            }
        }
        bail!("cairn {} failed: {last}", args.join(" "))
    }

    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut with_json = vec!["--json"];
        with_json.extend_from_slice(args);
        Ok(serde_json::from_str(&self.cli_ok(&with_json)?)?)
    }

    /// Polls `cluster status` until `done` holds.
    pub fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            if let Ok(status) = self.cli_json(&["cluster", "status"]) {
                if done(&status) {
                    return Ok(status);
                }
                last = status;
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?}; last status: {last}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Waits until every image of `images` has a ready version.
    pub fn wait_images_ready(&self, images: &[&str]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let listed = self.cli_json(&["image", "list"])?;
            let ready = |name: &str| {
                listed.as_array().is_some_and(|rows| {
                    rows.iter().any(|row| {
                        row["name"] == name
                            && row["versions"]
                                .as_object()
                                .is_some_and(|v| v.values().any(|v| v["state"] == "ready"))
                    })
                })
            };
            if images.iter().all(|name| ready(name)) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "images not ready: {listed}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn leader(&self) -> anyhow::Result<u64> {
        let status = self.wait_for(Duration::from_secs(30), |s| s["leader"].is_u64())?;
        status["leader"].as_u64().context("leader id")
    }

    /// The last lines of every node's log.
    pub fn logs(&self, lines: usize) -> String {
        node_logs(self.dir.path(), self.nodes.iter().map(|n| n.id), lines)
    }
}

/// Firmware of the virtual machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS with the e1000's iPXE option ROM: DHCP (user class iPXE) gives the script URL.
    Bios,
    /// OVMF's own PXE on a virtio NIC without option ROM: DHCP gives `ipxe.efi` over TFTP,
    /// which asks DHCP again and fetches the script.
    Uefi,
}

/// A qemu (TCG) on the LAN's tap0. Its serial console is a unix socket: a thread copies what
/// the machine prints to `serial` (a file), and [`Qemu::type_text`] types on it.
pub struct Qemu {
    child: Option<Child>,
    pub serial: PathBuf,
    pub started: Instant,
    keyboard: std::os::unix::net::UnixStream,
}

impl Qemu {
    pub fn start(
        lab: &Lab,
        work: &Path,
        firmware: Firmware,
        mac: &str,
        run: &str,
    ) -> anyhow::Result<Qemu> {
        let serial = work.join(format!("serial-{run}.log"));
        let qemu_log = std::fs::File::create(work.join(format!("qemu-{run}.log")))?;
        let mut command = Command::new("ip");
        command.args([
            "netns",
            "exec",
            &lab.lan(),
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "512",
        ]);
        command.args(["-no-reboot", "-nographic", "-monitor", "none"]);
        command.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
        match firmware {
            Firmware::Bios => {
                command.args([
                    "-boot",
                    "n",
                    "-device",
                    &format!("e1000,netdev=n0,mac={mac}"),
                ]);
            }
            Firmware::Uefi => {
                let vars = work.join(format!("vars-{run}.fd"));
                std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars)
                    .context("copying OVMF_VARS_4M.fd (package ovmf)")?;
                command.args([
                    "-drive",
                    "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                ]);
                command
                    .arg("-drive")
                    .arg(format!("if=pflash,format=raw,file={}", vars.display()));
                command.args([
                    "-device",
                    &format!("virtio-net-pci,netdev=n0,mac={mac},romfile=,bootindex=1"),
                ]);
            }
        }
        // `wait=on`: qemu starts the machine only once the socket is connected, so no output
        // is lost.
        let socket = work.join(format!("serial-{run}.sock"));
        let _ = std::fs::remove_file(&socket);
        command.arg("-chardev").arg(format!(
            "socket,id=serial0,path={},server=on,wait=on",
            socket.display()
        ));
        command.args(["-serial", "chardev:serial0"]);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(qemu_log.try_clone()?)
            .stderr(qemu_log)
            .spawn()
            .context("starting qemu")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let keyboard = loop {
            match std::os::unix::net::UnixStream::connect(&socket) {
                Ok(stream) => break stream,
                Err(error) => {
                    if child.try_wait()?.is_some() || Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        bail!(
                            "qemu's serial socket {}: {error}; see qemu-{run}.log",
                            socket.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let mut screen = keyboard.try_clone()?;
        let mut file = std::fs::File::create(&serial)?;
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut buffer = [0u8; 4096];
            // Ends when qemu closes the socket.
            while let Ok(n @ 1..) = screen.read(&mut buffer) {
                if file.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        });
        Ok(Qemu {
            child: Some(child),
            serial,
            started: Instant::now(),
            keyboard,
        })
    }

    /// Types `text` on the serial console, a character at a time (firmware polls a small FIFO).
    pub fn type_text(&mut self, text: &str) -> anyhow::Result<()> {
        use std::io::Write;
        for byte in text.bytes() {
            self.keyboard.write_all(&[byte])?;
            std::thread::sleep(Duration::from_millis(30));
        }
        Ok(())
    }

    /// Polls `done` every `poll` until it holds; after `timeout`, fails with `what` and the
    /// console's last lines.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        poll: Duration,
        mut done: impl FnMut(&Qemu) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self)? {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{what}:\n{}",
                tail(&self.console(), 30)
            );
            std::thread::sleep(poll);
        }
        Ok(())
    }

    /// Waits until the console shows `text`.
    pub fn wait_for_text(&mut self, text: &str, timeout: Duration) -> anyhow::Result<()> {
        self.wait_for_marker(text, &[], timeout).map(|_| ())
    }

    /// The serial console so far, without terminal escapes.
    pub fn console(&self) -> String {
        let bytes = std::fs::read(&self.serial).unwrap_or_default();
        without_escapes(&String::from_utf8_lossy(&bytes))
    }

    /// Waits for `marker` on the console; gives up when the machine stopped, a line in `fail`
    /// appeared, or `timeout` passed. Returns the seconds from power-on to the marker.
    pub fn wait_for_marker(
        &mut self,
        marker: &str,
        fail: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<f64> {
        loop {
            let console = self.console();
            if console.contains(marker) {
                return Ok(self.started.elapsed().as_secs_f64());
            }
            if let Some(bad) = fail.iter().find(|f| console.contains(**f)) {
                bail!("console shows {bad:?}:\n{}", tail(&console, 40));
            }
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?.is_some(),
                None => true,
            };
            if exited {
                bail!("qemu exited before {marker:?}:\n{}", tail(&console, 40));
            }
            if self.started.elapsed() > timeout {
                bail!("no {marker:?} after {timeout:?}:\n{}", tail(&console, 40));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// dnsmasq on the LAN's bridge as the site's own DHCP server: addresses from .200-.220 and
/// nothing about booting, which is the setup proxyDHCP is for.
pub struct Dnsmasq {
    child: Child,
    pub leases: PathBuf,
    pub log: PathBuf,
}

impl Dnsmasq {
    pub fn start(lab: &Lab, work: &Path) -> anyhow::Result<Dnsmasq> {
        let leases = work.join("dnsmasq.leases");
        let log = work.join("dnsmasq.log");
        let config = work.join("dnsmasq.conf");
        std::fs::write(
            &config,
            format!(
                "port=0\ninterface=br0\nbind-interfaces\nuser=root\n\
                 dhcp-range={SUBNET}.200,{SUBNET}.220,255.255.255.0,10m\n\
                 dhcp-leasefile={}\nlog-dhcp\nlog-facility={}\n",
                leases.display(),
                log.display()
            ),
        )?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.lan(),
                "dnsmasq",
                "--keep-in-foreground",
            ])
            .arg(format!("--conf-file={}", config.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq (package dnsmasq)")?;
        Ok(Dnsmasq { child, leases, log })
    }

    /// The lease file's line for `mac` (`<expiry> <mac> <ip> ...`), if dnsmasq leased to it.
    pub fn lease_of(&self, mac: &str) -> Option<String> {
        std::fs::read_to_string(&self.leases)
            .ok()?
            .lines()
            .find(|line| line.split_whitespace().nth(1) == Some(mac))
            .map(str::to_owned)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` without terminal control sequences (CSI: ESC [ parameters final byte), carriage
/// returns and backspaces: a serial console, or a node's colored log.
pub fn without_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for n in chars.by_ref() {
                        if n.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
            }
            '\r' | '\u{8}' => {}
            c => out.push(c),
        }
    }
    out
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
