#!/bin/bash
# A real PXE boot through Cairn's boot servers instead of dnsmasq: takes the team's reference
# (shared/peers/pxe-boot-reference.sh: qemu + iPXE + tgt in a private network namespace), swaps
# its dnsmasq section for bootproto's `boot_lab` example (DHCP + TFTP + router advertisements,
# with in-memory stand-ins for the cluster), and runs it. The iPXE script is fetched over TFTP
# here (no HTTP server in bootproto); the node serves it over HTTP.
#
# Usage (root): bootproto/tests/pxe_lab.sh [MODE=bios|undionly|efi|efirom via the environment]
#   CAIRN_LAB_NO_RA=1 leaves router solicitations unanswered (shows iPXE's ~14 s wait).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
REF=${REF:-$HERE/../../shared/peers/pxe-boot-reference.sh}
[ -f "$REF" ] || REF=/work/shared/peers/pxe-boot-reference.sh
TARGET=${CARGO_TARGET_DIR:-$HERE/../target}
(cd "$HERE" && cargo build -q -p cairn-bootproto --example boot_lab)
export BOOT_LAB=$TARGET/debug/examples/boot_lab
LAB=$(mktemp /tmp/pxe-lab.XXXXXX.sh)
trap 'rm -f "$LAB"' EXIT
awk '
  /^mkdir -p \$WORK\/tftp$/ { skipping = 1
    print "mkdir -p $WORK/tftp"
    print "cp /usr/lib/ipxe/undionly.kpxe /usr/lib/ipxe/ipxe.efi $WORK/tftp/"
    print "ip netns exec $NS $BOOT_LAB br0 $SRV $NET.0/24 $NET.100 $NET.150 $WORK/tftp tftp://$SRV/boot.ipxe $MAC > $WORK/bootlab.log 2>&1 &"
    print "DNSMASQ_PID=$!"
    print "sleep 0.5"
    next }
  /^# -+ 4\./ { skipping = 0 }
  skipping { next }
  /dnsmasq.log/ { print "cat $WORK/bootlab.log"; next }
  { print }
' "$REF" > "$LAB"
grep -q BOOT_LAB "$LAB" || { echo "pxe_lab: the reference script changed shape; update the awk program"; exit 2; }
bash "$LAB"
