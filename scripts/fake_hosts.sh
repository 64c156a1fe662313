#!/usr/bin/env bash
# Fake hosts on this machine for `runner launch`: network namespaces on one bridge, each with its
# own sshd, hostname and mount namespace, reached with a generated key through an ssh config that
# only this script's `ssh` wrapper uses. Needs root, iproute2, util-linux and openssh-server.
#
#   scripts/fake_hosts.sh up [COUNT] [DIR] [PREFIX] [SUBNET]   # default: 2 /tmp/runner-fake-hosts runner 10.77.0
#   export PATH=DIR/bin:$PATH          # runner launch's ssh (and mlx.launch's) then reach the hosts
#   runner launch --hosts 10.77.0.1,10.77.0.2 MODEL -p "…"
#   ip netns exec PREFIX-h1 …          # a command on host 1 (its network; same files and processes)
#   ip link set PREFIX-h2 down         # cut host 2's link (up again to mend it)
#   scripts/fake_hosts.sh down [DIR]   # stop every sshd and anything left in the namespaces, remove them
#
# Host i is namespace PREFIX-hI at SUBNET.I; this machine is SUBNET.254 on the bridge PREFIX-br.
# The hosts share this machine's files and processes: only the network, the hostname and the
# mounts are their own (tests hide a folder on one host with a tmpfs mounted in its sshd's namespace).
set -euo pipefail

up() {
    local count=${1:-2} dir=${2:-/tmp/runner-fake-hosts} prefix=${3:-runner} subnet=${4:-10.77.0}
    [[ $(id -u) == 0 ]] || { echo "fake_hosts: needs root (network namespaces, sshd)" >&2; exit 1; }
    [[ -x /usr/sbin/sshd ]] || { echo "fake_hosts: no sshd: apt-get install openssh-server" >&2; exit 1; }
    [[ ! -e $dir/hosts ]] || { echo "fake_hosts: $dir is in use: scripts/fake_hosts.sh down $dir" >&2; exit 1; }
    mkdir -p "$dir/bin" /run/sshd
    echo "$prefix $count $subnet" > "$dir/hosts"      # what `down` removes
    ssh-keygen -q -t ed25519 -N '' -C runner-fake-hosts -f "$dir/id_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C runner-fake-hosts -f "$dir/host_key"
    cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s/ssh_config "$@"\n' "$dir" > "$dir/bin/ssh"
    chmod +x "$dir/bin/ssh"

    ip link add "$prefix-br" type bridge
    ip addr add "$subnet.254/24" dev "$prefix-br"
    ip link set "$prefix-br" up
    local i ns
    for i in $(seq 1 "$count"); do
        ns=$prefix-h$i
        ip netns add "$ns"
        ip link add "$ns" type veth peer name eth0 netns "$ns"
        ip link set "$ns" master "$prefix-br" up
        ip -n "$ns" addr add "$subnet.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        mkdir -p "$dir/$ns"
        cat > "$dir/$ns/sshd_config" <<EOF
ListenAddress $subnet.$i
HostKey $dir/host_key
PidFile $dir/$ns/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
EOF
        # its own hostname and mounts; sshd daemonizes and writes its pid file before it returns
        ip netns exec "$ns" unshare --uts --mount --propagation private \
            sh -c "hostname $ns && exec /usr/sbin/sshd -f $dir/$ns/sshd_config -E $dir/$ns/sshd.log"
        printf 'Host %s\n  HostName %s\n' "$ns" "$subnet.$i" >> "$dir/ssh_config"
    done
    cat >> "$dir/ssh_config" <<EOF
Host $prefix-h* $subnet.*
  User root
  IdentityFile $dir/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  GlobalKnownHostsFile /dev/null
  LogLevel ERROR
EOF
    echo "fake_hosts: $count hosts, $subnet.1-$subnet.$count (namespaces $prefix-h1..$prefix-h$count); export PATH=$dir/bin:\$PATH"
}

down() {
    local dir=${1:-/tmp/runner-fake-hosts} prefix count subnet i ns pid
    [[ -e $dir/hosts ]] || { echo "fake_hosts: nothing set up in $dir" >&2; exit 1; }
    read -r prefix count subnet < "$dir/hosts"
    for i in $(seq 1 "$count"); do
        ns=$prefix-h$i
        # sshd first (no new sessions), then whatever runs in the namespace: ranks left by a failed test
        [[ -f $dir/$ns/sshd.pid ]] && kill "$(cat "$dir/$ns/sshd.pid")" 2>/dev/null || true
        if ip netns list | grep -qw "$ns"; then
            for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns delete "$ns"
        fi
        ip link delete "$ns" 2>/dev/null || true
    done
    ip link delete "$prefix-br" 2>/dev/null || true
    rm -rf "$dir"
}

case ${1:-} in
    up) shift; up "$@" ;;
    down) shift; down "$@" ;;
    *) echo "usage: $0 up [COUNT] [DIR] [PREFIX] [SUBNET] | down [DIR]" >&2; exit 2 ;;
esac
