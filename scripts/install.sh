#!/usr/bin/env bash
# Installs shardq as a systemd service, or removes it again.
#
# Usage: scripts/install.sh [--binary PATH] [--root DIR] [--prefix DIR] [--dry-run]
#        scripts/install.sh --uninstall [--purge] [--root DIR] [--prefix DIR] [--dry-run]
#
#   --binary PATH  install this shardq instead of building one (`cargo build --release`)
#   --root DIR     install under DIR as if it were / (a staging root for packages, or a
#                  test). No user or group is created there, nothing is chowned, and
#                  neither systemctl nor sysctl runs: the target host's package scripts
#                  do that (the commands are printed)
#   --prefix DIR   where the binary and docs go (default /usr/local: bin/shardq,
#                  share/doc/shardq/); /etc/shardq and /var/lib/shardq stay where the
#                  unit expects them
#   --dry-run      print every action, change nothing
#   --uninstall    stop and disable the service, remove the binary, the unit, the sysctl
#                  file and the docs; keep the configuration and the data
#   --purge        with --uninstall: also remove /etc/shardq, /var/lib/shardq (every
#                  topic) and the shardq user and group
#
# What an install does (each step says what it did; running it again is harmless):
#   1. the binary: built here (or --binary), installed as PREFIX/bin/shardq
#   2. the system user and group shardq (no login shell, no home directory)
#   3. /etc/shardq, and /var/lib/shardq owned by shardq, mode 0700
#   4. /etc/shardq/shardq.toml from tuning/shardq.toml, never over an existing one
#   5. /etc/systemd/system/shardq.service from tuning/systemd/, ExecStart= pointing at
#      the installed binary
#   6. tuning/sysctl.d/*.conf into /etc/sysctl.d/, loaded now
#   7. the operators' docs into PREFIX/share/doc/shardq/ (the unit's Documentation=)
#   8. `systemctl daemon-reload` where systemd runs (/run/systemd/system exists)
# It does not enable or start the service: it says how.
#
# Exit status: 0 when every step succeeded; 1 when a step failed (the message says which;
# the other steps still ran); 2 for a usage error.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
binary_source=
root=/
prefix=/usr/local
dry_run=0
uninstall=0
purge=0

usage() {
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || usage; binary_source=$2; shift 2 ;;
        --root) [ $# -ge 2 ] || usage; root=$2; shift 2 ;;
        --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown argument '$1'" >&2; usage ;;
    esac
done

if [ "$purge" = 1 ] && [ "$uninstall" = 0 ]; then
    echo "install.sh: --purge only goes with --uninstall" >&2
    exit 2
fi
case "$prefix" in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path, got '$prefix'" >&2; exit 2 ;;
esac
prefix=${prefix%/}
# The staging root as an absolute path without a trailing slash ("" for the real root),
# so that "$staging$path" is the file a target path lands in.
if [ "$root" = / ]; then
    staging=
else
    if [ "$dry_run" = 0 ]; then
        mkdir -p "$root"
        staging=$(cd "$root" && pwd)
    else
        case "$root" in
            /*) staging=${root%/} ;;
            *) staging=$PWD/${root%/} ;;
        esac
    fi
fi

user=shardq
group=shardq
binary_path=$prefix/bin/shardq
doc_directory=$prefix/share/doc/shardq
config_directory=/etc/shardq
config_path=$config_directory/shardq.toml
data_directory=/var/lib/shardq
unit_path=/etc/systemd/system/shardq.service
sysctl_directory=/etc/sysctl.d
config_source=$repo/tuning/shardq.toml
unit_source=$repo/tuning/systemd/shardq.service

failed_steps=()

say() { echo "install.sh: $*"; }
warn() { echo "install.sh: $*" >&2; }

# Runs a command that changes the system, or only prints it under --dry-run. Every change
# goes through here, so a dry run names each one and changes nothing.
act() {
    local quoted
    # Quoted as the shell would need it, so a printed command can be pasted.
    quoted=$(printf '%q ' "$@")
    if [ "$dry_run" = 1 ]; then
        say "would run: ${quoted% }"
    else
        say "run: ${quoted% }"
        "$@"
    fi
}

# The real root: only here are users created, files chowned and systemd or sysctl told.
on_real_root() { [ -z "$staging" ]; }
systemd_running() { on_real_root && [ -d /run/systemd/system ]; }

if on_real_root && [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
    warn "installing into / needs root (uid 0, this is uid $(id -u)); use sudo, or --root DIR to stage, or --dry-run to see the steps"
    exit 1
fi

# Removes a file if it is there; saying so either way keeps reruns readable.
remove_file() {
    local path=$1
    if [ -e "$staging$path" ] || [ -L "$staging$path" ]; then
        act rm -f -- "$staging$path"
    else
        say "$staging$path: already absent"
    fi
}

uninstall() {
    if systemd_running; then
        if systemctl is-enabled --quiet shardq 2>/dev/null || systemctl is-active --quiet shardq 2>/dev/null; then
            act systemctl disable --now shardq
        else
            say "shardq.service is neither enabled nor running"
        fi
    fi
    remove_file "$binary_path"
    remove_file "$unit_path"
    local file
    for file in "$repo"/tuning/sysctl.d/*.conf; do
        [ -e "$file" ] || continue
        remove_file "$sysctl_directory/$(basename "$file")"
    done
    say "the kernel keeps the values loaded from the sysctl file until the next boot (or \`sysctl --system\`)"
    for file in operations.md tuning.md; do
        remove_file "$doc_directory/$file"
    done
    if [ -d "$staging$doc_directory" ]; then
        act rmdir --ignore-fail-on-non-empty -- "$staging$doc_directory"
    fi
    if systemd_running; then
        act systemctl daemon-reload
    fi
    if [ "$purge" = 1 ]; then
        if [ -e "$staging$config_directory" ]; then
            act rm -rf -- "$staging$config_directory"
        else
            say "$staging$config_directory: already absent"
        fi
        if [ -e "$staging$data_directory" ]; then
            warn "removing $staging$data_directory: every topic and message in it"
            act rm -rf -- "$staging$data_directory"
        else
            say "$staging$data_directory: already absent"
        fi
        if on_real_root; then
            if getent passwd "$user" >/dev/null; then
                act userdel "$user"
            else
                say "user $user: already absent"
            fi
            if getent group "$group" >/dev/null; then
                act groupdel "$group"
            else
                say "group $group: already absent"
            fi
        else
            say "staging root $staging: no user or group to remove (the target host's package removal does: userdel $user; groupdel $group)"
        fi
    else
        say "kept $staging$config_directory and $staging$data_directory (--purge removes them)"
    fi
}

# 1. The binary.
install_binary() {
    local source=$binary_source
    if [ -z "$source" ]; then
        source=$repo/target/release/shardq
        # cargo runs as whoever runs this script; under sudo that leaves root-owned files
        # in target/. Building first and passing --binary avoids it.
        if [ "$dry_run" = 1 ]; then
            say "would run: cargo build --release --bin shardq (in $repo)"
        else
            say "run: cargo build --release --bin shardq (in $repo)"
            (cd "$repo" && cargo build --release --bin shardq)
        fi
    fi
    if [ "$dry_run" = 0 ] && [ ! -f "$source" ]; then
        warn "binary: $source is not a file; nothing installed"
        failed_steps+=(binary)
        return
    fi
    act install -D -m 0755 -- "$source" "$staging$binary_path"
}

# 2. The user and group the unit runs as.
create_user() {
    if ! on_real_root; then
        say "staging root $staging: not creating user or group $user (they would be this host's, not the target's); the target host's package must run: groupadd --system $group; useradd --system --gid $group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $user"
        return
    fi
    local nologin=/usr/sbin/nologin
    [ -x "$nologin" ] || nologin=/sbin/nologin
    if getent group "$group" >/dev/null; then
        say "group $group: exists"
    else
        act groupadd --system "$group"
    fi
    if getent passwd "$user" >/dev/null; then
        say "user $user: exists"
    else
        act useradd --system --gid "$group" --no-create-home --home-dir /nonexistent \
            --shell "$nologin" --comment "shardq message broker" "$user"
    fi
}

# 3. Directories.
create_directories() {
    act install -d -m 0755 -- "$staging$config_directory"
    # 0700, as the unit's StateDirectoryMode= sets it at every start: only the broker reads its data.
    # The unit's StateDirectoryMode= sets the mode systemd keeps it at when it starts.
    if on_real_root; then
        act install -d -m 0700 -o "$user" -g "$group" -- "$data_directory"
    else
        say "staging root: $staging$data_directory stays owned by $(id -un); the target host must chown $user:$group $data_directory"
        act install -d -m 0700 -- "$staging$data_directory"
    fi
}

# 4. The configuration, only where there is none: an operator's edits are never lost.
# It is the repository's example with data_dir set to the service's data directory.
install_config() {
    local destination=$staging$config_path
    if [ ! -f "$config_source" ]; then
        warn "config: $config_source is missing from this checkout; no $config_path installed"
        failed_steps+=(config)
        return
    fi
    local rendered
    rendered=$(sed -e "s|^data_dir = .*|data_dir = \"$data_directory\"|" "$config_source")
    if [ -e "$destination" ]; then
        if [ "$(cat "$destination")" = "$rendered" ]; then
            say "config: $destination exists and matches $config_source (data_dir = \"$data_directory\")"
        else
            say "config: $destination exists and differs from $config_source; kept as it is (compare: diff -u $destination $config_source)"
        fi
        return
    fi
    if [ "$(grep -c '^data_dir = ' "$config_source" || true)" != 1 ]; then
        warn "config: $config_source has no single data_dir line to point at $data_directory; no $config_path installed"
        failed_steps+=(config)
        return
    fi
    if [ "$dry_run" = 1 ]; then
        say "would write $destination from $config_source with data_dir = \"$data_directory\""
        return
    fi
    say "write $destination from $config_source with data_dir = \"$data_directory\""
    install -d -m 0755 -- "$(dirname "$destination")"
    local temporary
    temporary=$(mktemp "$(dirname "$destination")/.shardq.toml.XXXXXX")
    printf '%s\n' "$rendered" >"$temporary"
    # Readable by the broker's group, writable by root only.
    chmod 0640 "$temporary"
    if on_real_root; then
        chown "root:$group" "$temporary"
    fi
    mv -f -- "$temporary" "$destination"
}

# 5. The unit, with ExecStart= and Documentation= pointing where this install put things.
install_unit() {
    if [ ! -f "$unit_source" ]; then
        warn "unit: $unit_source is missing; no unit installed"
        failed_steps+=(unit)
        return
    fi
    local exec_lines
    exec_lines=$(grep -c '^ExecStart=' "$unit_source" || true)
    if [ "$exec_lines" != 1 ]; then
        warn "unit: $unit_source has $exec_lines ExecStart= lines, expected 1; no unit installed"
        failed_steps+=(unit)
        return
    fi
    # Only the program (the first word) is replaced, so the arguments the unit passes stay
    # as they are in the repository.
    local rendered
    rendered=$(sed -e "s|^ExecStart=[^ ]*|ExecStart=$binary_path|" \
        -e "s|^Documentation=file://.*/operations.md|Documentation=file://$doc_directory/operations.md|" \
        "$unit_source")
    if [ -f "$staging$unit_path" ] && [ "$(cat "$staging$unit_path")" = "$rendered" ]; then
        say "unit: $staging$unit_path is up to date"
        return
    fi
    if [ "$dry_run" = 1 ]; then
        say "would write $staging$unit_path from $unit_source with ExecStart=$binary_path ..."
        return
    fi
    say "write $staging$unit_path from $unit_source with ExecStart=$binary_path ..."
    install -d -m 0755 -- "$(dirname "$staging$unit_path")"
    local temporary
    temporary=$(mktemp "$(dirname "$staging$unit_path")/.shardq.service.XXXXXX")
    printf '%s\n' "$rendered" >"$temporary"
    chmod 0644 "$temporary"
    # A rename, so systemd never reads half a file.
    mv -f -- "$temporary" "$staging$unit_path"
}

# 6. sysctl settings: installed, and loaded now on the real root.
install_sysctl() {
    local file found=0
    for file in "$repo"/tuning/sysctl.d/*.conf; do
        [ -e "$file" ] || continue
        found=1
        local destination
        destination=$sysctl_directory/$(basename "$file")
        act install -D -m 0644 -- "$file" "$staging$destination"
        if on_real_root; then
            if [ "$dry_run" = 1 ]; then
                say "would run: sysctl -q -p $destination"
            elif ! sysctl -q -p "$destination"; then
                # A container's read-only /proc/sys, or a key this kernel lacks: the file
                # is in place for the next boot either way.
                warn "sysctl: some settings of $destination could not be loaded now (above); they apply at the next boot where the kernel allows them"
            fi
        fi
    done
    if [ "$found" = 0 ]; then
        warn "sysctl: no tuning/sysctl.d/*.conf in $repo; none installed"
        failed_steps+=(sysctl)
    fi
}

# 7. The docs the unit's Documentation= names.
install_docs() {
    local file
    for file in operations.md tuning.md; do
        if [ -f "$repo/docs/$file" ]; then
            act install -D -m 0644 -- "$repo/docs/$file" "$staging$doc_directory/$file"
        else
            say "docs: $repo/docs/$file is not in this checkout; skipped"
        fi
    done
}

# 8. Tell systemd.
reload_systemd() {
    if systemd_running; then
        act systemctl daemon-reload
    elif on_real_root; then
        say "systemd is not running here (/run/systemd/system is absent): no daemon-reload"
    else
        say "staging root: no daemon-reload (the target host's package does it)"
    fi
}

if [ "$dry_run" = 1 ]; then
    say "dry run: nothing is changed"
fi
if [ "$uninstall" = 1 ]; then
    verb=uninstalling
else
    verb=installing
fi
if on_real_root; then
    say "$verb on / (prefix $prefix)"
else
    say "$verb in the staging root $staging (prefix $prefix)"
fi

if [ "$uninstall" = 1 ]; then
    uninstall
    exit 0
fi

install_binary
create_user
create_directories
install_config
install_unit
install_sysctl
install_docs
reload_systemd

if [ ${#failed_steps[@]} -gt 0 ]; then
    warn "failed steps: ${failed_steps[*]} (see above); the others are done"
    exit 1
fi
if systemd_running; then
    say "done. Start it: systemctl enable --now shardq; watch it: systemctl status shardq"
else
    say "done"
fi
