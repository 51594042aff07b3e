#!/usr/bin/env bash
# Prepare everything needed to boot small QEMU/TCG guests for ksmtrace.
#
#   sample-traces/vm/prepare.sh [CACHE_DIR]
#
# CACHE_DIR defaults to $KSMTRACE_VM_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/ksmtrace/vm.
# Idempotent: re-running only installs/downloads what is missing or out of date.
#
# What it does (all from Debian packages):
#   * installs qemu-system-x86 (qemu-system-x86_64) and cpio with apt-get (no recommends);
#   * `apt-get download`s the kernel image package (default linux-image-cloud-amd64,
#     resolved to the versioned linux-image-<abi>-cloud-amd64) and extracts only its
#     vmlinuz into the cache with dpkg-deb -x (nothing is installed into /boot);
#   * `apt-get download`s busybox-static and extracts /bin/busybox (not installed,
#     because busybox-static Conflicts with the host's `busybox` package);
#   * builds a small, byte-for-byte reproducible initramfs.cpio.gz whose /init prints
#     KSMTRACE-GUEST-READY on the serial console, fills some memory deterministically,
#     prints KSMTRACE-GUEST-WORK-DONE and then idles until the guest is powered off/killed;
#   * writes CACHE_DIR/manifest.json with the package versions and file hashes.
#
# Environment knobs:
#   KSMTRACE_VM_CACHE       cache directory (overridden by the first argument)
#   KSMTRACE_VM_KERNEL_PKG  kernel package, default linux-image-cloud-amd64
#                           (linux-image-amd64 also works; any linux-image-* package)
#   KSMTRACE_VM_NO_APT_UPDATE=1  never run `apt-get update`
set -euo pipefail

CACHE="${1:-${KSMTRACE_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ksmtrace/vm}}"
KERNEL_META="${KSMTRACE_VM_KERNEL_PKG:-linux-image-cloud-amd64}"
HOST_PKGS=(qemu-system-x86 cpio)

log() { printf 'prepare.sh: %s\n' "$*" >&2; }
die() { printf 'prepare.sh: error: %s\n' "$*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "need root (or sudo) for apt-get"
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    [ "${KSMTRACE_VM_NO_APT_UPDATE:-0}" = 1 ] && return 0
    log "apt-get update"
    "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
}

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

candidate_version() {  # prints the candidate version of a package, empty if unknown
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" {print $2; exit}'
}

mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"

# --- 1. host packages ------------------------------------------------------------------
missing=()
for p in "${HOST_PKGS[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    log "apt-get install ${missing[*]}"
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
QEMU_BIN="$(command -v qemu-system-x86_64)" || die "qemu-system-x86_64 not found after install"
QEMU_PKG_VERSION="$(dpkg-query -W -f='${Version}' qemu-system-x86)"
QEMU_VERSION_LINE="$("$QEMU_BIN" --version | head -n1)"

# --- 2. resolve the kernel / busybox packages --------------------------------------------
[ -n "$(candidate_version "$KERNEL_META")" ] || apt_update_once
[ -n "$(candidate_version "$KERNEL_META")" ] || die "no candidate for package $KERNEL_META"
# A meta package (linux-image-amd64) depends on the versioned image package; a versioned
# package name is used as is.
KERNEL_PKG="$(apt-cache depends --important "$KERNEL_META" 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')"
[ -n "$KERNEL_PKG" ] || KERNEL_PKG="$KERNEL_META"
KERNEL_VERSION="$(candidate_version "$KERNEL_PKG")"
[ -n "$KERNEL_VERSION" ] || die "no candidate for package $KERNEL_PKG"
KERNEL_META_VERSION="$(candidate_version "$KERNEL_META")"
BUSYBOX_PKG=busybox-static
BUSYBOX_VERSION="$(candidate_version "$BUSYBOX_PKG")"
[ -n "$BUSYBOX_VERSION" ] || { apt_update_once; BUSYBOX_VERSION="$(candidate_version "$BUSYBOX_PKG")"; }
[ -n "$BUSYBOX_VERSION" ] || die "no candidate for package $BUSYBOX_PKG"

TMP="$(mktemp -d "$CACHE/.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# fetch_deb PKG VERSION: apt-get download PKG=VERSION into $TMP, print the .deb path
fetch_deb() {
    local pkg="$1" ver="$2" dir
    dir="$TMP/dl-$pkg"
    mkdir -p "$dir"
    # _apt cannot write into a root-only temp dir; downloading unsandboxed is fine here.
    (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null 2>&1) \
        || { apt_update_once; (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null); } \
        || die "apt-get download $pkg=$ver failed"
    find "$dir" -maxdepth 1 -name '*.deb' | head -n1
}

# --- 3. kernel: extract vmlinuz ------------------------------------------------------------
KDIR="$CACHE/kernel/${KERNEL_PKG}_${KERNEL_VERSION}"
if [ ! -s "$KDIR/vmlinuz" ]; then
    log "downloading $KERNEL_PKG=$KERNEL_VERSION"
    deb="$(fetch_deb "$KERNEL_PKG" "$KERNEL_VERSION")"
    dpkg-deb -x "$deb" "$TMP/kx"
    vmlinuz="$(find "$TMP/kx/boot" -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | head -n1)"
    [ -n "$vmlinuz" ] || die "$KERNEL_PKG contains no /boot/vmlinuz-*"
    mkdir -p "$KDIR"
    basename "$vmlinuz" | sed 's/^vmlinuz-//' > "$KDIR/release"
    cp "$TMP"/kx/boot/config-* "$KDIR/config" 2>/dev/null || true
    sha256sum "$deb" | awk '{print $1}' > "$KDIR/deb.sha256"
    cp "$vmlinuz" "$KDIR/vmlinuz.tmp" && mv "$KDIR/vmlinuz.tmp" "$KDIR/vmlinuz"
    rm -rf "$TMP/kx" "$(dirname "$deb")"
fi
KERNEL_RELEASE="$(cat "$KDIR/release")"
ln -sfn "kernel/${KERNEL_PKG}_${KERNEL_VERSION}/vmlinuz" "$CACHE/vmlinuz"

# --- 4. busybox: extract the static binary --------------------------------------------------
BDIR="$CACHE/busybox/${BUSYBOX_PKG}_${BUSYBOX_VERSION}"
if [ ! -x "$BDIR/busybox" ]; then
    log "downloading $BUSYBOX_PKG=$BUSYBOX_VERSION"
    deb="$(fetch_deb "$BUSYBOX_PKG" "$BUSYBOX_VERSION")"
    dpkg-deb -x "$deb" "$TMP/bx"
    mkdir -p "$BDIR"
    cp "$TMP/bx/bin/busybox" "$BDIR/busybox.tmp" && mv "$BDIR/busybox.tmp" "$BDIR/busybox"
    rm -rf "$TMP/bx" "$(dirname "$deb")"
fi
BUSYBOX="$BDIR/busybox"

# --- 5. initramfs -------------------------------------------------------------------------
ROOT="$TMP/root"
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,run,work,etc}
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$ROOT/bin/$applet"
done
ln -s bin "$ROOT/sbin"
cat > "$ROOT/init" <<'INIT'
#!/bin/busybox sh
# ksmtrace guest /init (PID 1).  Kernel command line knobs (all optional):
#   ksmtrace.id=N            guest index, used in the per-guest page contents (default 0)
#   ksmtrace.shared_mb=N     MiB of pages identical in every guest (default 32)
#   ksmtrace.zero_mb=N       MiB of zero-filled pages (default 16)
#   ksmtrace.unique_mb=N     MiB of pages unique to this guest id (default 8)
#   ksmtrace.poweroff_after=S  power off S seconds after the work is done (default: never)
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp
exec </dev/console >/dev/console 2>&1

id=0 shared_mb=32 zero_mb=16 unique_mb=8 poweroff_after=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ksmtrace.id=*) id="${arg#*=}" ;;
        ksmtrace.shared_mb=*) shared_mb="${arg#*=}" ;;
        ksmtrace.zero_mb=*) zero_mb="${arg#*=}" ;;
        ksmtrace.unique_mb=*) unique_mb="${arg#*=}" ;;
        ksmtrace.poweroff_after=*) poweroff_after="${arg#*=}" ;;
    esac
done
up() { cut -d' ' -f1 /proc/uptime; }

echo "KSMTRACE-GUEST-READY id=$id uptime=$(up)"

# Deterministic memory contents (kept in the rootfs page cache, i.e. guest RAM):
# page p of a region is the 64-byte line "KSMTRACE <tag> page <p>" repeated 64 times.
fill() {  # fill FILE TAG MIB
    awk -v tag="$2" -v pages="$(( $3 * 256 ))" 'BEGIN {
        for (p = 0; p < pages; p++) {
            s = sprintf("%-63s\n", "KSMTRACE " tag " page " p)
            for (i = 0; i < 6; i++) s = s s
            printf "%s", s
        }
    }' > "$1"
}
fill /work/shared.bin shared "$shared_mb"
dd if=/dev/zero of=/work/zero.bin bs=1M count="$zero_mb" 2>/dev/null
fill /work/unique.bin "guest-$id" "$unique_mb"
sync
echo "KSMTRACE-GUEST-WORK-DONE id=$id uptime=$(up) shared_mb=$shared_mb zero_mb=$zero_mb unique_mb=$unique_mb"

if [ -n "$poweroff_after" ]; then
    sleep "$poweroff_after"
    echo "KSMTRACE-GUEST-POWEROFF id=$id uptime=$(up)"
    poweroff -f
fi
while :; do sleep 3600; done
INIT
chmod 0755 "$ROOT/init"
# Reproducible archive: fixed mtimes, owners, sorted names, no inode numbers, no gzip name/time.
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio --quiet -o -H newc --reproducible -R 0:0) | gzip -n -9 > "$TMP/initramfs.cpio.gz"
if ! cmp -s "$TMP/initramfs.cpio.gz" "$CACHE/initramfs.cpio.gz" 2>/dev/null; then
    mv "$TMP/initramfs.cpio.gz" "$CACHE/initramfs.cpio.gz"
    log "built $CACHE/initramfs.cpio.gz"
else
    log "initramfs unchanged"
fi

# --- 6. manifest --------------------------------------------------------------------------
VMLINUZ_SHA="$(sha256sum "$KDIR/vmlinuz" | awk '{print $1}')"
INITRD_SHA="$(sha256sum "$CACHE/initramfs.cpio.gz" | awk '{print $1}')"
cat > "$CACHE/manifest.json.tmp" <<JSON
{
  "qemu_package": "qemu-system-x86",
  "qemu_package_version": "$QEMU_PKG_VERSION",
  "qemu_binary": "$QEMU_BIN",
  "qemu_version": "$QEMU_VERSION_LINE",
  "kernel_meta_package": "$KERNEL_META",
  "kernel_meta_version": "$KERNEL_META_VERSION",
  "kernel_package": "$KERNEL_PKG",
  "kernel_package_version": "$KERNEL_VERSION",
  "kernel_release": "$KERNEL_RELEASE",
  "kernel_deb_sha256": "$(cat "$KDIR/deb.sha256")",
  "vmlinuz": "$KDIR/vmlinuz",
  "vmlinuz_sha256": "$VMLINUZ_SHA",
  "busybox_package": "$BUSYBOX_PKG",
  "busybox_package_version": "$BUSYBOX_VERSION",
  "initramfs": "$CACHE/initramfs.cpio.gz",
  "initramfs_sha256": "$INITRD_SHA"
}
JSON
mv "$CACHE/manifest.json.tmp" "$CACHE/manifest.json"

echo "cache:      $CACHE"
echo "qemu:       qemu-system-x86 $QEMU_PKG_VERSION ($QEMU_VERSION_LINE)"
echo "kernel:     $KERNEL_PKG $KERNEL_VERSION (release $KERNEL_RELEASE, via $KERNEL_META $KERNEL_META_VERSION)"
echo "busybox:    $BUSYBOX_PKG $BUSYBOX_VERSION"
echo "vmlinuz:    $KDIR/vmlinuz  sha256=$VMLINUZ_SHA"
echo "initramfs:  $CACHE/initramfs.cpio.gz  sha256=$INITRD_SHA"
