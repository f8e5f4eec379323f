# shellcheck shell=bash
# Sourced by the bench scripts: installs the measuring tools they need when missing.
#   install_missing COMMAND...  -> apt-get installs each missing COMMAND (its package has
#                                  the same name: fio, iperf3, python3)
install_missing() {
    local missing=() tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing ${missing[*]} with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
