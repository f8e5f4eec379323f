#!/usr/bin/env bash
# Installs shardq as a systemd service, or removes it again.
#
# Usage: scripts/install.sh [--binary PATH] [--root DIR] [--prefix DIR] [--sysctl] [--dry-run]
#        scripts/install.sh --uninstall [--purge] [--root DIR] [--prefix DIR] [--dry-run]
#
#   --binary PATH  install this shardq instead of building one (`cargo build --release`)
#   --root DIR     install under DIR as if it were / (a staging root for packages, or a
#                  test). No user or group is created there, nothing is chowned, and
#                  neither systemctl nor sysctl runs: the target host's package scripts
#                  do that (the commands are printed). A DIR that resolves to / (`/.`,
#                  `//`) is the real root
#   --prefix DIR   where the binary and docs go (default /usr/local: bin/shardq,
#                  share/doc/shardq/); /etc/shardq and /var/lib/shardq stay where the
#                  unit expects them
#   --sysctl       also install tuning/sysctl.d/60-shardq.conf (host-wide kernel
#                  settings; off unless asked for). On the real root only the settings
#                  that raise this host's current value are kept active and loaded, and
#                  the values they replace are saved in the installed file
#   --dry-run      print every action, change nothing
#   --uninstall    stop and disable the service, remove the binary, the unit, the docs
#                  and the sysctl file (putting back the kernel values it raised); keep
#                  the configuration and the data
#   --purge        with --uninstall: also remove /etc/shardq, /var/lib/shardq (every
#                  topic) and the shardq user and group
#
# What an install does (each step says what it did; running it again is harmless):
#   1. the binary: built here (or --binary), installed as PREFIX/bin/shardq
#   2. the system user and group shardq (no login shell, no home directory)
#   3. /etc/shardq, and /var/lib/shardq owned by shardq, mode 0700
#   4. a short /etc/shardq/shardq.toml (data_dir, listen, metrics_listen; every other key
#      keeps its default), never over an existing one
#   5. /etc/systemd/system/shardq.service from tuning/systemd/, ExecStart= pointing at
#      the installed binary
#   6. with --sysctl only: /etc/sysctl.d/60-shardq.conf, loaded now (see --sysctl)
#   7. the operators' docs into PREFIX/share/doc/shardq/ (the unit's Documentation=),
#      with the full commented example config as shardq.toml.example
#   8. `systemctl daemon-reload` where systemd runs (/run/systemd/system exists)
# It does not enable or start the service: it says how.
#
# Tests point the sysctl step at a fake /proc/sys with SHARDQ_INSTALL_PROC_SYS; set, it
# is read and written as the kernel's even under --root.
#
# Exit status: 0 when every step succeeded; 1 when a step failed (each failure is named
# and the failed steps are listed at the end; the other steps still ran); 2 for a usage
# error.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
binary_source=
root=/
prefix=/usr/local
dry_run=0
uninstall=0
purge=0
sysctl=0

usage() {
    sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2
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
        --sysctl) sysctl=1; shift ;;
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
# so that "$staging$path" is the file a target path lands in. Resolved first: a root that
# resolves to / (`/.`, `//`, `../..` from near the top) is the real root, with its root
# check and its systemctl calls, never a staging root that happens to be /.
if [ "$dry_run" = 0 ] && [ ! -e "$root" ]; then
    mkdir -p -- "$root"
fi
if ! staging=$(realpath -m -- "$root"); then
    echo "install.sh: cannot resolve --root '$root'" >&2
    exit 2
fi
case "$staging" in
    *[!/]*) staging=${staging%/} ;;
    *) staging= ;;
esac

user=shardq
group=shardq
binary_path=$prefix/bin/shardq
doc_directory=$prefix/share/doc/shardq
config_directory=/etc/shardq
config_path=$config_directory/shardq.toml
data_directory=/var/lib/shardq
unit_path=/etc/systemd/system/shardq.service
sysctl_directory=/etc/sysctl.d
sysctl_name=60-shardq.conf
sysctl_path=$sysctl_directory/$sysctl_name
sysctl_source=$repo/tuning/sysctl.d/$sysctl_name
config_source=$repo/tuning/shardq.toml
example_path=$doc_directory/shardq.toml.example
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

# Runs one step in a subshell under set -e: a command that fails inside it ends that step
# only, which is then named and recorded, and the run goes on to the next step. A step
# also fails by returning non-zero after saying why.
run_step() {
    local name=$1 status
    shift
    set +e
    ( set -e; "$@" )
    status=$?
    set -e
    if [ "$status" != 0 ]; then
        warn "$name: failed (status $status, see above)"
        failed_steps+=("$name")
    fi
}

# Where the running kernel's settings are read and written: /proc/sys on the real root,
# SHARDQ_INSTALL_PROC_SYS where a test sets it, none on a staging root.
kernel_settings() {
    if [ -n "${SHARDQ_INSTALL_PROC_SYS:-}" ]; then
        echo "${SHARDQ_INSTALL_PROC_SYS%/}"
    elif on_real_root; then
        echo /proc/sys
    fi
}

# A setting's value with its fields separated by one space (/proc/sys uses tabs).
normalize_value() {
    local -a fields
    read -r -a fields <<<"$1"
    echo "${fields[*]}"
}

# The current value of KEY under the settings directory, normalized; fails where the
# kernel has no such key.
read_setting() {
    local file=$1/${2//.//}
    [ -f "$file" ] || return 1
    normalize_value "$(<"$file")"
}

write_setting() {
    local file=$1/${2//.//}
    printf '%s\n' "$3" >"$file"
}

# Whether CURRENT is below WANTED: the number itself for a single number, the last field
# (the maximum) for a vector such as tcp_rmem. Anything not numeric is never below.
value_below() {
    local current=${1##* } wanted=${2##* }
    [[ $current =~ ^[0-9]+$ && $wanted =~ ^[0-9]+$ ]] || return 1
    [ "$((10#$current))" -lt "$((10#$wanted))" ]
}

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

stop_service() {
    if systemd_running; then
        if systemctl is-enabled --quiet shardq 2>/dev/null || systemctl is-active --quiet shardq 2>/dev/null; then
            act systemctl disable --now shardq
        else
            say "shardq.service is neither enabled nor running"
        fi
    fi
}

remove_files() {
    remove_file "$binary_path"
    remove_file "$unit_path"
    local file
    for file in operations.md tuning.md; do
        remove_file "$doc_directory/$file"
    done
    remove_file "$example_path"
    if [ -d "$staging$doc_directory" ]; then
        act rmdir --ignore-fail-on-non-empty -- "$staging$doc_directory"
    fi
    if systemd_running; then
        act systemctl daemon-reload
    fi
}

# Puts back the kernel values the installed sysctl file raised (its "# shardq-original:"
# lines), where they still hold what the file set, then removes the file. A value that
# cannot be written back keeps the file, and its record, for another try.
remove_sysctl() {
    local path=$staging$sysctl_path settings line key value current failures=0
    if [ ! -e "$path" ] && [ ! -L "$path" ]; then
        say "$path: already absent"
        return 0
    fi
    settings=$(kernel_settings)
    if [ -n "$settings" ]; then
        local -A original=() active=()
        local -a order=()
        while IFS= read -r line; do
            if [[ $line =~ ^#\ shardq-original:\ ([A-Za-z0-9_.-]+)\ =\ (.*)$ ]]; then
                original[${BASH_REMATCH[1]}]=$(normalize_value "${BASH_REMATCH[2]}")
                order+=("${BASH_REMATCH[1]}")
            elif [[ $line =~ ^([A-Za-z0-9_.-]+)\ *=\ *(.*)$ ]]; then
                active[${BASH_REMATCH[1]}]=$(normalize_value "${BASH_REMATCH[2]}")
            fi
        done <"$path"
        for key in "${order[@]}"; do
            value=${original[$key]}
            if ! current=$(read_setting "$settings" "$key"); then
                say "sysctl: $key is not on this kernel; nothing to restore"
                continue
            fi
            if [ "$current" != "${active[$key]:-}" ]; then
                say "sysctl: $key is $current, no longer the ${active[$key]:-(unset)} this file set; left as it is"
                continue
            fi
            if [ "$dry_run" = 1 ]; then
                say "would restore sysctl $key to $value (now $current)"
            elif write_setting "$settings" "$key" "$value"; then
                say "restored sysctl $key to $value (was $current)"
            else
                warn "sysctl: could not restore $key to $value"
                failures=$((failures + 1))
            fi
        done
    else
        say "staging root: no kernel values to restore (the target host's package removal does, from the shardq-original lines of $sysctl_path)"
    fi
    if [ "$failures" -gt 0 ]; then
        warn "sysctl: kept $path, which records the original values, for another try"
        return 1
    fi
    remove_file "$sysctl_path"
}

purge() {
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
}

uninstall() {
    run_step service stop_service
    run_step files remove_files
    run_step sysctl remove_sysctl
    if [ "$purge" = 1 ]; then
        case " ${failed_steps[*]} " in
            *" service "*)
                warn "purge: skipped, since the service may still be running (stop it, then run --uninstall --purge again)"
                failed_steps+=(purge)
                ;;
            *) run_step purge purge ;;
        esac
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
        return 1
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
# Short on purpose: only what the service needs (its data directory) and what an operator
# most often changes (the addresses). Every other key keeps its default, so a later
# release's new default reaches this host; the full commented example goes next to the
# docs (step 7) for reference.
render_config() {
    local listen metrics_listen
    listen=$(grep '^listen = ' "$config_source" || true)
    metrics_listen=$(grep '^metrics_listen = ' "$config_source" || true)
    if [ "$(printf '%s\n' "$listen" | grep -c .)" != 1 ] ||
        [ "$(printf '%s\n' "$metrics_listen" | grep -c .)" != 1 ]; then
        warn "config: $config_source has no single listen and metrics_listen line each; no $config_path installed"
        return 1
    fi
    cat <<EOF
# shardq broker configuration, read by shardq.service. Only the keys set here differ
# from the built-in defaults, so a later release's new defaults reach this host: add only
# the keys you change. Every key, with its default and what it does:
#   $example_path
# Check: shardq config print --config $config_path (effective values and
# where each came from); shardq doctor --config $config_path. Then:
# systemctl restart shardq.

# Where the topics live: the unit's StateDirectory=, owned by the shardq user.
data_dir = "$data_directory"
# Clients connect here (shard k also listens on port + 1 + k).
$listen
# /metrics, /health/live and /health/ready over HTTP; "off": nowhere.
$metrics_listen
EOF
}

install_config() {
    local destination=$staging$config_path
    if [ ! -f "$config_source" ]; then
        warn "config: $config_source is missing from this checkout; no $config_path installed"
        return 1
    fi
    local rendered
    if [ -e "$destination" ]; then
        rendered=$(render_config 2>/dev/null || true)
        if [ "$(cat "$destination")" = "$rendered" ]; then
            say "config: $destination exists and matches what this install writes (data_dir = \"$data_directory\")"
        else
            say "config: $destination exists and differs from what this install writes; kept as it is (the full example: $example_path)"
        fi
        return
    fi
    rendered=$(render_config)
    if [ "$dry_run" = 1 ]; then
        say "would write $destination: data_dir = \"$data_directory\", listen and metrics_listen from $config_source"
        return
    fi
    say "write $destination: data_dir = \"$data_directory\", listen and metrics_listen from $config_source"
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
        return 1
    fi
    local exec_lines
    exec_lines=$(grep -c '^ExecStart=' "$unit_source" || true)
    if [ "$exec_lines" != 1 ]; then
        warn "unit: $unit_source has $exec_lines ExecStart= lines, expected 1; no unit installed"
        return 1
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

# 6. sysctl settings, only with --sysctl: they are the host's, not the broker's. On a live
# kernel each setting stays active only where it raises the current value (for a vector
# such as tcp_rmem, its maximum): a host tuned higher keeps its values, and a lower
# setting (swappiness, slow start after idle) is left to the operator. The value each
# active setting replaced is saved in the installed file, as "# shardq-original: KEY =
# VALUE", for --uninstall; a rerun keeps the originals an earlier run saved.
install_sysctl() {
    local destination=$staging$sysctl_path
    if [ "$sysctl" = 0 ]; then
        if [ -e "$destination" ]; then
            say "sysctl: $destination is there from an earlier install; left as it is (--sysctl updates it; --uninstall removes it and restores the values it raised)"
        else
            say "sysctl: no kernel settings installed (they are host-wide; --sysctl installs tuning/sysctl.d/$sysctl_name, docs/tuning.md \"Kernel settings\")"
        fi
        return 0
    fi
    if [ ! -f "$sysctl_source" ]; then
        warn "sysctl: $sysctl_source is missing from this checkout; none installed"
        return 1
    fi
    local settings
    settings=$(kernel_settings)
    if [ -z "$settings" ]; then
        act install -D -m 0644 -- "$sysctl_source" "$destination"
        say "staging root: $sysctl_path installed as it is and not loaded; on the target, load only the settings that raise its values (scripts/install.sh --sysctl there does)"
        return 0
    fi
    local -A original=()
    local line key wanted current
    if [ -f "$destination" ]; then
        while IFS= read -r line; do
            if [[ $line =~ ^#\ shardq-original:\ ([A-Za-z0-9_.-]+)\ =\ (.*)$ ]]; then
                original[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
            fi
        done <"$destination"
    fi
    local saved='' body=''
    local -a keys=() values=() currents=()
    while IFS= read -r line; do
        if [[ $line =~ ^([A-Za-z0-9_.-]+)\ *=\ *(.*)$ ]]; then
            key=${BASH_REMATCH[1]}
            wanted=$(normalize_value "${BASH_REMATCH[2]}")
            if ! current=$(read_setting "$settings" "$key"); then
                say "sysctl: $key is not on this kernel; left out"
                body+="# left out, not on this kernel: $line"$'\n'
            elif [ -n "${original[$key]+set}" ] || value_below "$current" "$wanted"; then
                saved+="# shardq-original: $key = ${original[$key]:-$current}"$'\n'
                body+="$line"$'\n'
                if [ "$current" != "$wanted" ]; then
                    keys+=("$key")
                    values+=("$wanted")
                    currents+=("$current")
                fi
            else
                say "sysctl: $key is $current here, not below $wanted; left alone"
                body+="# left alone, this host had $current: $line"$'\n'
            fi
        else
            body+="$line"$'\n'
        fi
    done <"$sysctl_source"
    local rendered
    rendered="# Installed by scripts/install.sh --sysctl from tuning/sysctl.d/$sysctl_name. Only the
# settings that raised this host's value are active; --uninstall puts back the values
# they replaced (the shardq-original lines, not to be edited) and removes this file.
$saved
$body"
    if [ -f "$destination" ] && [ "$(cat "$destination")" = "${rendered%$'\n'}" ]; then
        say "sysctl: $destination is up to date"
    elif [ "$dry_run" = 1 ]; then
        say "would write $destination: ${#keys[@]} settings to raise, the rest commented out"
    else
        # Written before any value changes, so the originals are on disk first.
        say "write $destination: the settings that raise this host's values, the rest commented out"
        install -d -m 0755 -- "$(dirname "$destination")"
        local temporary
        temporary=$(mktemp "$(dirname "$destination")/.$sysctl_name.XXXXXX")
        printf '%s' "$rendered" >"$temporary"
        chmod 0644 "$temporary"
        mv -f -- "$temporary" "$destination"
    fi
    local index
    for index in "${!keys[@]}"; do
        if [ "$dry_run" = 1 ]; then
            say "would set sysctl ${keys[$index]} to ${values[$index]} (now ${currents[$index]})"
        elif write_setting "$settings" "${keys[$index]}" "${values[$index]}" 2>/dev/null; then
            say "set sysctl ${keys[$index]} to ${values[$index]} (was ${currents[$index]})"
        else
            # A container's read-only /proc/sys: the file applies at the next boot.
            warn "sysctl: ${keys[$index]} could not be set now; $destination sets it at the next boot where the kernel allows it"
        fi
    done
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
    if [ -f "$config_source" ]; then
        act install -D -m 0644 -- "$config_source" "$staging$example_path"
    else
        say "docs: $config_source is not in this checkout; no $example_path"
    fi
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
else
    run_step binary install_binary
    run_step user create_user
    run_step directories create_directories
    run_step config install_config
    run_step unit install_unit
    run_step sysctl install_sysctl
    run_step docs install_docs
    run_step systemd reload_systemd
fi

if [ ${#failed_steps[@]} -gt 0 ]; then
    warn "failed steps: ${failed_steps[*]} (see above); the others are done"
    exit 1
fi
if [ "$uninstall" = 1 ]; then
    say "done"
    exit 0
fi
if systemd_running; then
    say "done. Start it: systemctl enable --now shardq; watch it: systemctl status shardq"
else
    say "done"
fi
