#!/usr/bin/env bash
# Host tuning for a shardq broker that survives no reboot, and its exact undo.
#
# Usage: scripts/tune-host.sh apply|revert|status [--dry-run] [--cpus LIST]
#            [--data-dir DIR] [--state-file FILE] [--scheduler NAME] [--governor NAME]
#
#   apply    moves device interrupts off the shards' CPUs (/proc/irq/N/smp_affinity_list),
#            sets those CPUs' frequency governor to performance, and sets the I/O
#            scheduler of the disk under the data directory to none (NVMe and virtio
#            disks). The value each file held before is saved in the state file first;
#            a value already saved is kept, so applying twice still reverts to the
#            originals.
#   revert   writes every saved value back, exactly, and removes the state file.
#   status   shows what apply would look at, and whether it was applied. Changes nothing.
#
#   --cpus LIST        the CPUs the shards run on, as the kernel writes lists: 0-3,8
#                      (default: every online CPU). `shardq serve --cores N` runs its
#                      shards on the first N online CPUs; pass those
#   --data-dir DIR     the broker's data directory (default /var/lib/shardq; an ancestor
#                      if it does not exist yet)
#   --state-file FILE  where originals are kept (default /run/shardq-tune-host.state:
#                      /run is emptied at boot, as are the settings themselves). One not
#                      owned by the user running this, writable by others, or naming a
#                      file apply does not write is refused
#   --scheduler NAME   the I/O scheduler to set (default none, and only on NVMe, virtio
#                      and Xen disks; given, it is set on any disk)
#   --governor NAME    the frequency governor to set (default performance)
#   --dry-run          print every write, write nothing (not even the state file)
#
# A knob this host lacks (no cpufreq in most VMs, an interrupt whose affinity the kernel
# manages) is reported and skipped. Tests point the script at a fake tree with
# SHARDQ_TUNE_SYS_ROOT (default /sys) and SHARDQ_TUNE_PROC_ROOT (default /proc).
#
# Exit status: 0 when done (skipped knobs included); 1 when revert could not restore a
# value (it stays in the state file for another try) or the host cannot be read; 2 for a
# usage error.
set -euo pipefail
shopt -s extglob

sys_root=${SHARDQ_TUNE_SYS_ROOT:-/sys}
proc_root=${SHARDQ_TUNE_PROC_ROOT:-/proc}
# Resolved, so the paths readlink -f gives under it keep it as their prefix.
sys_root=$(readlink -f -- "$sys_root" || echo "$sys_root")
proc_root=${proc_root%/}

usage() {
    sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
    apply|revert|status) ;;
    -h|--help) usage ;;
    *) echo "tune-host.sh: unknown command '$command' (apply, revert or status)" >&2; usage ;;
esac

dry_run=0
cpus_argument=
data_directory=/var/lib/shardq
state_file=/run/shardq-tune-host.state
scheduler_argument=
governor=performance
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --cpus) [ $# -ge 2 ] || usage; cpus_argument=$2; shift 2 ;;
        --data-dir) [ $# -ge 2 ] || usage; data_directory=$2; shift 2 ;;
        --state-file) [ $# -ge 2 ] || usage; state_file=$2; shift 2 ;;
        --scheduler) [ $# -ge 2 ] || usage; scheduler_argument=$2; shift 2 ;;
        --governor) [ $# -ge 2 ] || usage; governor=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "tune-host.sh: unknown argument '$1'" >&2; usage ;;
    esac
done

say() { echo "tune-host.sh: $*"; }
fail() { echo "tune-host.sh: $*" >&2; exit 1; }

# --- CPU lists --------------------------------------------------------------------------

# "0-3,8" -> "0 1 2 3 8". Fails on anything that is not a kernel CPU list.
expand_list() {
    local list=$1 part first last cpu
    local -a parts
    [ -n "$list" ] || return 0
    IFS=, read -r -a parts <<<"$list"
    for part in "${parts[@]}"; do
        if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
            first=$((10#${BASH_REMATCH[1]}))
            last=$((10#${BASH_REMATCH[2]}))
            [ "$first" -le "$last" ] || return 1
            for ((cpu = first; cpu <= last; cpu++)); do printf '%s ' "$cpu"; done
        elif [[ $part =~ ^[0-9]+$ ]]; then
            printf '%s ' "$((10#$part))"
        else
            return 1
        fi
    done
}

# "0 1 2 3 8" (any order, repeats allowed) -> "0-3,8".
compress_list() {
    local -a sorted
    local cpu start='' previous='' out=''
    mapfile -t sorted < <(printf '%s\n' "$@" | sort -n -u)
    for cpu in "${sorted[@]}"; do
        [ -n "$cpu" ] || continue
        if [ -n "$previous" ] && [ "$cpu" -eq $((previous + 1)) ]; then
            previous=$cpu
            continue
        fi
        if [ -n "$start" ]; then
            out+=${out:+,}$([ "$start" = "$previous" ] && echo "$start" || echo "$start-$previous")
        fi
        start=$cpu
        previous=$cpu
    done
    if [ -n "$start" ]; then
        out+=${out:+,}$([ "$start" = "$previous" ] && echo "$start" || echo "$start-$previous")
    fi
    echo "$out"
}

online_file=$sys_root/devices/system/cpu/online
[ -r "$online_file" ] || fail "cannot read the online CPUs from $online_file"
online_list=$(<"$online_file")
expanded=$(expand_list "$online_list") ||
    fail "$online_file holds '$online_list', not a CPU list"
read -r -a online_cpus <<<"$expanded"
declare -A is_online=()
for cpu in "${online_cpus[@]}"; do is_online[$cpu]=1; done

if [ -n "$cpus_argument" ]; then
    expanded=$(expand_list "$cpus_argument") ||
        { echo "tune-host.sh: --cpus '$cpus_argument' is not a CPU list (like 0-3,8)" >&2; exit 2; }
    read -r -a shard_cpus <<<"$expanded"
    for cpu in "${shard_cpus[@]}"; do
        [ -n "${is_online[$cpu]:-}" ] ||
            { echo "tune-host.sh: --cpus names CPU $cpu, which is not online (online: $online_list)" >&2; exit 2; }
    done
else
    shard_cpus=("${online_cpus[@]}")
fi
declare -A is_shard=()
for cpu in "${shard_cpus[@]}"; do is_shard[$cpu]=1; done
housekeeping_cpus=()
for cpu in "${online_cpus[@]}"; do
    [ -n "${is_shard[$cpu]:-}" ] || housekeeping_cpus+=("$cpu")
done
shard_list=$(compress_list "${shard_cpus[@]}")
housekeeping_list=$(compress_list "${housekeeping_cpus[@]}")

# --- The state file ---------------------------------------------------------------------

# One line per changed file: "sys" or "proc", the path under that root, the value it held
# (tab-separated; sysfs and procfs values are one line without tabs). Paths are kept
# relative to the root so a state written against a fake tree never names the real one.
#
# revert (often under sudo) writes back to the paths this file names, so it is trusted
# only when it can only have come from apply: owned by the user running the script and
# writable by nobody else, and naming only the files apply writes, in the shapes apply
# writes them (no "..", no absolute path). Anything else refuses the whole file.
valid_state_key() {
    local key=$1
    [[ $key == proc:irq/+([0-9])/smp_affinity_list ]] && return 0
    [[ $key == sys:devices/system/cpu/cpu+([0-9])/cpufreq/scaling_governor ]] && return 0
    [[ $key =~ ^sys:block/[A-Za-z0-9][A-Za-z0-9_.:!+-]*/queue/scheduler$ ]] && return 0
    return 1
}

declare -A saved=()
saved_order=()
if [ -f "$state_file" ]; then
    exec {state_fd}<"$state_file" || fail "cannot read $state_file"
    # Checked on the open file (fstat), so it is the file read below.
    read -r state_type state_owner state_mode < <(stat -L -c '%F %u %a' - <&"$state_fd" | sed 's/^regular file/regular-file/') ||
        fail "cannot stat $state_file"
    [ "$state_type" = regular-file ] || fail "refusing $state_file: not a regular file"
    [ "$state_owner" = "$(id -u)" ] ||
        fail "refusing $state_file: owned by uid $state_owner, not by uid $(id -u) running this; apply writes it as the user who runs revert"
    (( (8#$state_mode & 8#022) == 0 )) ||
        fail "refusing $state_file: mode $state_mode lets others write it (apply writes it 0600)"
    line_number=0
    while IFS=$'\t' read -r root_name relative value; do
        line_number=$((line_number + 1))
        [ -n "$root_name" ] || continue
        key=$root_name:$relative
        valid_state_key "$key" ||
            fail "refusing $state_file: line $line_number names $root_name '$relative', which is no file apply writes"
        [ -n "${saved[$key]+set}" ] || saved_order+=("$key")
        saved[$key]=$value
    done <&"$state_fd"
    exec {state_fd}<&-
fi

write_state() {
    local key temporary
    if [ ${#saved_order[@]} -eq 0 ]; then
        rm -f -- "$state_file"
        return
    fi
    mkdir -p -- "$(dirname "$state_file")"
    temporary=$(mktemp "$state_file.XXXXXX")
    for key in "${saved_order[@]}"; do
        printf '%s\t%s\t%s\n' "${key%%:*}" "${key#*:}" "${saved[$key]}" >>"$temporary"
    done
    # A rename: an interrupted apply leaves the old state or the new one, never half.
    mv -f -- "$temporary" "$state_file"
}

forget() {
    local key=$1 entry
    local -a kept=()
    unset "saved[$key]"
    for entry in "${saved_order[@]}"; do
        [ "$entry" = "$key" ] || kept+=("$entry")
    done
    saved_order=("${kept[@]}")
}

full_path() {
    local key=$1
    case "${key%%:*}" in
        sys) echo "$sys_root/${key#*:}" ;;
        proc) echo "$proc_root/${key#*:}" ;;
    esac
}

# Writes VALUE (plus the newline sysfs expects) into a file; on failure prints why and
# returns 1. The kernel's refusal (EIO, EINVAL) comes back as a failed write.
write_file() {
    local path=$1 value=$2 error
    if error=$( { printf '%s\n' "$value" >"$path"; } 2>&1 ); then
        return 0
    fi
    error=${error##*: }
    echo "${error:-write failed}"
    return 1
}

changed=0
refused=0
unchanged=0

# Sets KEY's file to VALUE, saving the value it holds first (unless one is saved already,
# which is the original from an earlier apply). DESCRIPTION names it in messages.
set_value() {
    local key=$1 value=$2 current=$3 description=$4 path error added=0
    path=$(full_path "$key")
    if [ "$dry_run" = 1 ]; then
        say "would set $description to $value (now $current): $path"
        changed=$((changed + 1))
        return
    fi
    if [ -z "${saved[$key]+set}" ]; then
        saved[$key]=$current
        saved_order+=("$key")
        added=1
        # Saved before the write, so a crash between the two still leaves the original
        # for revert.
        write_state
    fi
    if error=$(write_file "$path" "$value"); then
        say "set $description to $value (was $current)"
        changed=$((changed + 1))
    else
        say "$description: the kernel refused $value ($error); left at $current"
        refused=$((refused + 1))
        if [ "$added" = 1 ]; then
            forget "$key"
            write_state
        fi
    fi
}

# --- IRQ affinity -----------------------------------------------------------------------

# The names the interrupt is registered under (its handler directories), for messages.
irq_name() {
    local directory=$1 entry names=
    for entry in "$directory"/*/; do
        [ -d "$entry" ] || continue
        entry=${entry%/}
        names+=${names:+,}${entry##*/}
    done
    echo "${names:-unnamed}"
}

irqbalance_running() {
    local comm name
    for comm in "$proc_root"/[0-9]*/comm; do
        # A process may exit between the glob and the read.
        name=$(cat -- "$comm" 2>/dev/null) || continue
        [ "$name" = irqbalance ] && return 0
    done
    return 1
}

tune_irqs() {
    local directory irq file current target cpu name expanded
    local -a current_cpus remaining
    if [ ${#housekeeping_cpus[@]} -eq 0 ]; then
        say "irq affinity: every online CPU ($online_list) runs a shard, so no CPU is left for interrupts; skipped (run the broker on fewer CPUs, --cores N, and pass them as --cpus)"
        return
    fi
    if irqbalance_running; then
        say "irq affinity: irqbalance is running and will move interrupts back; stop it (systemctl disable --now irqbalance) or set IRQBALANCE_BANNED_CPULIST=$shard_list in /etc/default/irqbalance"
    fi
    local seen=0
    for directory in "$proc_root"/irq/[0-9]*; do
        file=$directory/smp_affinity_list
        [ -f "$file" ] || continue
        seen=$((seen + 1))
        irq=${directory##*/}
        current=$(<"$file")
        if ! expanded=$(expand_list "$current"); then
            say "irq $irq: smp_affinity_list holds '$current', not a CPU list; skipped"
            continue
        fi
        read -r -a current_cpus <<<"$expanded"
        remaining=()
        local touches=0
        for cpu in "${current_cpus[@]}"; do
            if [ -n "${is_shard[$cpu]:-}" ]; then touches=1; else remaining+=("$cpu"); fi
        done
        if [ "$touches" = 0 ]; then
            unchanged=$((unchanged + 1))
            continue
        fi
        # Keep a device's own narrowing (a NIC queue bound to one CPU) where it leaves
        # some CPU outside the shards; otherwise every CPU outside them.
        if [ ${#remaining[@]} -gt 0 ]; then
            target=$(compress_list "${remaining[@]}")
        else
            target=$housekeeping_list
        fi
        name=$(irq_name "$directory")
        set_value "proc:irq/$irq/smp_affinity_list" "$target" "$current" "irq $irq ($name) affinity"
    done
    [ "$seen" -gt 0 ] || say "irq affinity: no $proc_root/irq/*/smp_affinity_list here; skipped"
}

# --- CPU frequency governor ---------------------------------------------------------------

tune_governor() {
    local cpu directory current available
    local -a missing=()
    for cpu in "${shard_cpus[@]}"; do
        directory=$sys_root/devices/system/cpu/cpu$cpu/cpufreq
        if [ ! -f "$directory/scaling_governor" ]; then
            missing+=("$cpu")
            continue
        fi
        current=$(<"$directory/scaling_governor")
        if [ "$current" = "$governor" ]; then
            unchanged=$((unchanged + 1))
            continue
        fi
        if [ -f "$directory/scaling_available_governors" ]; then
            available=$(<"$directory/scaling_available_governors")
            if [[ " $available " != *" $governor "* ]]; then
                say "cpu $cpu governor: $governor is not offered (available: $available); left at $current"
                continue
            fi
        fi
        set_value "sys:devices/system/cpu/cpu$cpu/cpufreq/scaling_governor" "$governor" "$current" "cpu $cpu governor"
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "governor: CPUs $(compress_list "${missing[@]}") have no cpufreq (no frequency scaling exposed, as in most VMs); nothing to set there"
    fi
}

# --- I/O scheduler ------------------------------------------------------------------------

# The existing directory the data will live in: DIR, or its nearest existing ancestor.
existing_directory() {
    local directory=$1
    while [ ! -e "$directory" ]; do
        directory=$(dirname "$directory")
    done
    echo "$directory"
}

# The whole-disk sysfs directories under a block device's sysfs directory: itself or
# its parent for a partition, and for device mapper or md the disks beneath (slaves/).
whole_disks() {
    local device=$1 slave
    local found=0
    if [ -d "$device/slaves" ]; then
        for slave in "$device"/slaves/*; do
            [ -e "$slave" ] || continue
            found=1
            whole_disks "$(readlink -f "$slave")"
        done
    fi
    [ "$found" = 1 ] && return
    if [ -f "$device/partition" ]; then
        device=$(dirname "$device")
    fi
    echo "$device"
}

selected_scheduler() { # "none [mq-deadline] kyber" -> mq-deadline
    local text=$1
    if [[ $text =~ \[([^]]+)\] ]]; then echo "${BASH_REMATCH[1]}"; else echo "$text"; fi
}

data_disks() {
    local directory device_number major minor link
    directory=$(existing_directory "$data_directory")
    device_number=$(stat -c %d -- "$directory")
    # Linux's dev_t encoding (major and minor split across the 64 bits).
    major=$(( ((device_number >> 8) & 0xfff) | ((device_number >> 32) & ~0xfff) ))
    minor=$(( (device_number & 0xff) | ((device_number >> 12) & ~0xff) ))
    link=$sys_root/dev/block/$major:$minor
    if [ ! -e "$link" ]; then
        echo "no-device $directory $major:$minor"
        return
    fi
    echo "directory $directory $major:$minor"
    whole_disks "$(readlink -f "$link")"
}

tune_scheduler() {
    local -a lines
    local disk name current target available rotational key kind directory device
    mapfile -t lines < <(data_disks)
    read -r kind directory device <<<"${lines[0]}"
    if [ "$kind" = no-device ]; then
        say "scheduler: $directory (device $device) is on no block device this host lists in $sys_root/dev/block (tmpfs, overlay, btrfs, NFS); nothing to set"
        return
    fi
    for disk in "${lines[@]:1}"; do
        name=${disk##*/}
        if [ ! -f "$disk/queue/scheduler" ]; then
            say "scheduler: $name (under $directory) has no queue/scheduler; nothing to set"
            continue
        fi
        available=$(<"$disk/queue/scheduler")
        current=$(selected_scheduler "$available")
        rotational=$(cat "$disk/queue/rotational" 2>/dev/null || echo unknown)
        if [ -n "$scheduler_argument" ]; then
            target=$scheduler_argument
        else
            case "$name" in
                nvme*|vd*|xvd*) target=none ;;
                *)
                    say "scheduler: $name (under $directory) is not an NVMe, virtio or Xen disk (rotational: $rotational); left at $current (--scheduler NAME sets one anyway)"
                    continue
                    ;;
            esac
        fi
        if [ "$current" = "$target" ]; then
            unchanged=$((unchanged + 1))
            continue
        fi
        if [[ " ${available//[\[\]]/} " != *" $target "* ]]; then
            say "scheduler: $name does not offer $target (offers: $available); left at $current"
            continue
        fi
        # Written through /sys/block/NAME, the one path shape revert accepts.
        if [ ! -f "$sys_root/block/$name/queue/scheduler" ] ||
            ! valid_state_key "sys:block/$name/queue/scheduler"; then
            say "scheduler: $name has no $sys_root/block/$name/queue/scheduler; skipped"
            continue
        fi
        key="sys:block/$name/queue/scheduler"
        set_value "$key" "$target" "$current" "$name I/O scheduler"
    done
}

# --- Commands -----------------------------------------------------------------------------

apply() {
    [ "$dry_run" = 1 ] && say "dry run: nothing is written"
    say "shard CPUs $shard_list; interrupts go to ${housekeeping_list:-no CPU}; data directory $data_directory"
    tune_irqs
    tune_governor
    tune_scheduler
    if [ "$dry_run" = 1 ]; then
        say "would change $changed values ($unchanged already right)"
    else
        say "changed $changed values, $refused refused by the kernel, $unchanged already right; originals in $state_file (revert restores them)"
    fi
}

revert() {
    [ "$dry_run" = 1 ] && say "dry run: nothing is written"
    if [ ! -f "$state_file" ]; then
        say "nothing to revert: $state_file does not exist (apply never ran, or the host rebooted, which reset these settings anyway)"
        return 0
    fi
    local key path error failures=0
    local -a keys=("${saved_order[@]}")
    for key in "${keys[@]}"; do
        path=$(full_path "$key")
        if [ "$dry_run" = 1 ]; then
            say "would restore $path to ${saved[$key]} (now $(cat "$path" 2>/dev/null || echo unreadable))"
            continue
        fi
        if error=$(write_file "$path" "${saved[$key]}"); then
            say "restored $path to ${saved[$key]}"
            forget "$key"
        else
            say "could not restore $path to ${saved[$key]} ($error); kept in $state_file"
            failures=$((failures + 1))
        fi
    done
    [ "$dry_run" = 1 ] && return 0
    write_state
    if [ "$failures" -gt 0 ]; then
        echo "tune-host.sh: $failures values could not be restored; run revert again once the cause is fixed" >&2
        return 1
    fi
    say "every saved value restored; $state_file removed"
}

status() {
    local directory irq current cpu touching=0 total=0 line kind device
    say "online CPUs $online_list; shard CPUs $shard_list; interrupts allowed on ${housekeeping_list:-no CPU}"
    if [ -f "$state_file" ]; then
        say "applied: $state_file holds ${#saved_order[@]} original values (revert restores them)"
    else
        say "not applied: no $state_file"
    fi
    for directory in "$proc_root"/irq/[0-9]*; do
        [ -f "$directory/smp_affinity_list" ] || continue
        total=$((total + 1))
        irq=${directory##*/}
        current=$(<"$directory/smp_affinity_list")
        for cpu in $(expand_list "$current" || true); do
            if [ -n "${is_shard[$cpu]:-}" ]; then
                say "irq $irq ($(irq_name "$directory")) may run on shard CPUs: $current"
                touching=$((touching + 1))
                break
            fi
        done
    done
    say "irq affinity: $touching of $total interrupts may run on shard CPUs"
    if irqbalance_running; then say "irqbalance is running"; fi
    for cpu in "${shard_cpus[@]}"; do
        line=$sys_root/devices/system/cpu/cpu$cpu/cpufreq/scaling_governor
        if [ -f "$line" ]; then
            say "cpu $cpu governor: $(<"$line")"
        else
            say "cpu $cpu governor: no cpufreq"
        fi
    done
    local -a lines
    mapfile -t lines < <(data_disks)
    read -r kind directory device <<<"${lines[0]}"
    if [ "$kind" = no-device ]; then
        say "scheduler: $directory (device $device) is on no listed block device"
    else
        for line in "${lines[@]:1}"; do
            if [ -f "$line/queue/scheduler" ]; then
                say "scheduler of ${line##*/} (under $directory): $(<"$line/queue/scheduler")"
            fi
        done
    fi
    # Settings docs/tuning.md discusses that this script leaves alone.
    [ -f "$sys_root/kernel/mm/transparent_hugepage/enabled" ] &&
        say "transparent hugepages: $(<"$sys_root/kernel/mm/transparent_hugepage/enabled")"
    [ -f "$proc_root/sys/vm/swappiness" ] && say "vm.swappiness: $(<"$proc_root/sys/vm/swappiness")"
    if [ -f "$proc_root/cmdline" ]; then
        local word isolation=
        for word in $(<"$proc_root/cmdline"); do
            case "$word" in isolcpus=*|nohz_full=*|rcu_nocbs=*|irqaffinity=*) isolation+=" $word" ;; esac
        done
        say "kernel command line CPU isolation:${isolation:- none}"
    fi
    return 0
}

case "$command" in
    apply) apply ;;
    revert) revert ;;
    status) status ;;
esac
