#!/usr/bin/env bash
# Install the system packages wsrunner needs (Debian/Ubuntu) when they are missing.
# Shared by .ci/run, `./dev serve` and `./dev test`, so the three never drift. As root it
# installs what is missing with apt-get; otherwise it names the packages and the command, and
# fails (exit 1).
set -euo pipefail

# command:package. bubblewrap, setpriv and libseccomp2: the sandbox; slirp4netns, ip and
# nsenter: its `egress` network; git and ripgrep: git steps and grep; the rest: the tests
# (lintian: tests/system/test_packaging.py checks the .deb with it, as Debian's archive would).
need=()
for pair in git:git bwrap:bubblewrap setpriv:util-linux nsenter:util-linux \
            slirp4netns:slirp4netns ip:iproute2 rg:ripgrep node:nodejs \
            redis-cli:redis-tools pg_isready:postgresql-client lintian:lintian; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
compgen -G '/usr/lib/*/libseccomp.so.2' >/dev/null || compgen -G '/lib/*/libseccomp.so.2' >/dev/null \
    || need+=(libseccomp2)
[ "${#need[@]}" -eq 0 ] && exit 0

mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
    echo "wsrunner needs: ${need[*]} (install with: sudo apt-get install ${need[*]})" >&2
    exit 1
fi
echo "installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
