#!/usr/bin/env bash
# Builds diskferry's PXE boot environment from Debian packages: OUTDIR/vmlinuz (Debian's kernel)
# and OUTDIR/initramfs.img (busybox-static, the static diskferry-client, the storage and network
# modules real machines and VMs need, and an init that brings the network up with DHCP and
# starts the client in dial-back mode). Nothing is installed on this machine: the packages are
# fetched with `apt-get download` and unpacked with `dpkg -x`.
#
# Usage: deploy/build-bootenv.sh OUTDIR
#
# The kernel command line carries the server, its public key and a one-time enrollment token (the
# server's /boot.ipxe fills them in):
#   diskferry.server=HOST:PORT  diskferry.serverkey=HEX  diskferry.token=HEX
# Put OUTDIR's two files in DATA_DIR/boot/ of `diskferry serve` (or point --boot-dir at OUTDIR).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: deploy/build-bootenv.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d /var/tmp/diskferry-bootenv.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Modules the environment loads, with their dependencies: virtio (VMs), Intel NICs common in
# real machines, SATA/NVMe/SCSI/USB storage, and hardware random generators (the agent makes
# its key at start, which waits until the kernel's generator is seeded: without RDRAND or one
# of these, a VM can wait minutes).
modules=(virtio_pci virtio_net virtio_blk virtio_scsi virtio_rng tpm_tis e1000 e1000e igb ixgbe r8169 tg3 bnx2
  ahci ata_piix nvme sd_mod sr_mod usb-storage uas xhci_pci ehci_pci megaraid_sas mpt3sas
  hpsa vmw_pvscsi vmxnet3 hv_netvsc hv_storvsc af_packet efivarfs)

echo "== the static client" >&2
deploy/build-client.sh "$work/client" >&2

echo "== Debian packages" >&2
kpkg=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -1)
[ -n "$kpkg" ] || { echo "error: cannot resolve linux-image-amd64 (run apt-get update)" >&2; exit 1; }
(cd "$work" && apt-get download "$kpkg" busybox-static >/dev/null 2>&1) ||
  { echo "error: apt-get download $kpkg busybox-static failed" >&2; exit 1; }
dpkg -x "$work"/linux-image-*.deb "$work/kernel"
dpkg -x "$work"/busybox-static_*.deb "$work/busybox"
kver=$(ls "$work/kernel/lib/modules")
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"

echo "== initramfs for $kver" >&2
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,run,etc,tmp,lib/modules}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
cp "$work/client/diskferry-client" "$root/bin/diskferry-client"
# Resolve dependencies from each module's .modinfo `depends=` and copy them in load order.
python3 - "$work/kernel/lib/modules/$kver" "$root/lib/modules" "${modules[@]}" > "$root/etc/modules.load" <<'EOF'
import os, re, shutil, sys
base, dest, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
by_name = {}
for d, _, files in os.walk(base):
    for f in files:
        if f.endswith(".ko"):
            by_name[f[:-3].replace("-", "_")] = os.path.join(d, f)
def deps(path):
    data = open(path, "rb").read()
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)", data)
    return [x for x in m.group(1).decode().split(",") if x] if m else []
order, seen = [], set()
def visit(name):
    name = name.replace("-", "_")
    if name in seen or name not in by_name:   # unknown: built into the kernel
        return
    seen.add(name)
    for d in deps(by_name[name]):
        visit(d)
    order.append(name)
for w in wanted:
    visit(w)
for name in order:
    shutil.copy(by_name[name], os.path.join(dest, name + ".ko"))
    print(name + ".ko")
EOF
cat > "$root/etc/udhcpc.script" <<'EOF'
#!/bin/busybox sh
# Configures an interface from a DHCP lease (busybox udhcpc calls this).
case "$1" in
  deconfig) ifconfig "$interface" 0.0.0.0 ;;
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}"
    if [ -n "$router" ]; then
      while route del default gw 0.0.0.0 dev "$interface" 2>/dev/null; do :; done
      for r in $router; do route add default gw "$r" dev "$interface"; break; done
    fi
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    ;;
esac
exit 0
EOF
cat > "$root/init" <<'EOF'
#!/bin/busybox sh
# diskferry boot environment: load drivers, get an address by DHCP, dial back to the server
# named on the kernel command line and serve this machine's disks to it. Never returns.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The kernel found no /dev/console in the initramfs: give init and the agent the console now,
# so the agent's own messages (why a connection failed) are on screen.
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /run
say() { echo "diskferry: $*" > /dev/console; }
# Kernel chatter (drivers for hardware this machine lacks) stays off the console.
dmesg -n 1
say "boot environment starting ($(uname -r))"
for m in $(cat /etc/modules.load); do insmod "/lib/modules/$m" 2>/dev/null; done
# UEFI machines: their variables, for the boot entry a deploy registers (--allow-firmware).
if [ -d /sys/firmware/efi/efivars ]; then
  mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null || say "efivarfs did not mount: no boot entries"
fi
server=; serverkey=; token=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    diskferry.server=*) server=${arg#diskferry.server=} ;;
    diskferry.serverkey=*) serverkey=${arg#diskferry.serverkey=} ;;
    diskferry.token=*) token=${arg#diskferry.token=} ;;
  esac
done
while [ -z "$server" ] || [ -z "$serverkey" ]; do
  say "no diskferry.server=HOST:PORT and diskferry.serverkey=KEY on the kernel command line; boot this machine from the server's /boot.ipxe"
  sleep 30
done
hostname diskferry-bootenv
# Network: every interface up, the first one to get a DHCP lease wins; retried until one does.
while :; do
  sleep 1
  for path in /sys/class/net/*; do
    ifname=${path##*/}
    [ "$ifname" = lo ] && continue
    ip link set "$ifname" up 2>/dev/null
  done
  leased=
  for path in /sys/class/net/*; do
    ifname=${path##*/}
    [ "$ifname" = lo ] && continue
    if udhcpc -i "$ifname" -n -q -t 4 -T 2 -s /etc/udhcpc.script >/dev/null 2>&1; then
      leased=$ifname
      break
    fi
  done
  [ -n "$leased" ] && break
  say "no DHCP lease on any interface ($(ls /sys/class/net | tr '\n' ' ')); retrying"
  sleep 4
done
say "network up on $leased: $(ip -4 addr show dev "$leased" | sed -n 's/.*inet \([0-9.\/]*\).*/\1/p')"
umask 077
# The agent's key lives in RAM for this boot: a restarted client is the same agent, so the
# one-time token is needed only once.
say "dialling $server (server key $(echo "$serverkey" | cut -c1-16))"
while :; do
  DISKFERRY_TOKEN=$token diskferry-client --connect "$server" --server-key "$serverkey" \
    --agent-key /run/diskferry-agent.key --allow-write --allow-power --allow-firmware
  say "diskferry-client exited with status $?; restarting in 5 s"
  sleep 5
done
EOF
chmod 755 "$root/init" "$root/etc/udhcpc.script" "$root/bin/busybox" "$root/bin/diskferry-client"
(cd "$root" && find . | sort | "$root/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9 > "$out/initramfs.img"

isize=$(stat -c %s "$out/initramfs.img")
ksize=$(stat -c %s "$out/vmlinuz")
echo "$out/vmlinuz: Debian $kver, $ksize bytes ($((ksize / 1024)) KiB)"
echo "$out/initramfs.img: $isize bytes ($((isize / 1024)) KiB), $(wc -l < "$root/etc/modules.load") modules"
