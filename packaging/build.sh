#!/usr/bin/env bash
# Build the single-file zipapp and the Debian package:
#   packaging/build.sh [OUTDIR]      (default: dist/)
# -> OUTDIR/wsrunner-<version>.pyz          runs with the building python3's minor version (3.11 here), no virtualenv
# -> OUTDIR/wsrunner_<version>_<arch>.deb   /usr/bin/wsrunner, the systemd unit, sysusers,
#                                           tmpfiles, /etc/wsrunner (conffiles), wsrunner(1)
# The version is the package's own (wsrunner/__init__.py). Needs ./dev's .venv (shiv) and dpkg-deb.
# The changelog and the manual page are dated SOURCE_DATE_EPOCH, else the last commit.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(realpath -m "${1:-dist}")"
mkdir -p "$out"
py=.venv/bin/python
version="$($py -c 'import wsrunner; print(wsrunner.__version__)')"
arch="$(dpkg --print-architecture)"
# The zipapp holds compiled extensions (pydantic-core, psycopg-binary, ...) for the building
# interpreter's minor version only: the package depends on exactly that series.
pymin="$($py -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
pynext="$($py -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')"
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
maintainer="$(sed -n 's/^Maintainer: //p' packaging/debian/control)"

# The zipapp: every dependency inside, including compiled wheels for this architecture.
pyz="$out/wsrunner-$version.pyz"
.venv/bin/shiv --quiet --reproducible --compressed -p '/usr/bin/env python3' -c wsrunner \
    -o "$pyz" . 2>&1 | grep -v '^WARNING: Location' || true
test -s "$pyz"
# shiv extracts the zipapp into $SHIV_ROOT/wsrunner_<build id>; postinst keeps only this build's.
build_id="$($py -c 'import json, sys, zipfile
print(json.loads(zipfile.ZipFile(sys.argv[1]).read("environment.json"))["build_id"])' "$pyz")"

stage="$(mktemp -d)"
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
deb=packaging/debian
install -D -m 0755 "$pyz" "$stage/usr/bin/wsrunner"
install -D -m 0644 deploy/systemd/wsrunner.service "$stage/usr/lib/systemd/system/wsrunner.service"
install -D -m 0644 $deb/wsrunner.sysusers "$stage/usr/lib/sysusers.d/wsrunner.conf"
install -D -m 0644 $deb/wsrunner.tmpfiles "$stage/usr/lib/tmpfiles.d/wsrunner.conf"
install -D -m 0640 packaging/wsrunner.conf "$stage/etc/wsrunner/wsrunner.conf"
install -D -m 0644 policies/default.yaml "$stage/etc/wsrunner/policy.yaml"
install -D -m 0644 $deb/policy.d-README "$stage/etc/wsrunner/policy.d/README"
install -D -m 0644 $deb/default "$stage/etc/default/wsrunner"
install -d -m 0700 "$stage/etc/wsrunner/credentials"
doc="$stage/usr/share/doc/wsrunner"
install -D -m 0644 README.md CHANGELOG.md -t "$doc"
install -D -m 0644 policies/strict.yaml policies/policy-v1.schema.json -t "$doc/policies"
install -D -m 0644 policies/examples/*.yaml -t "$doc/policies/examples"
install -D -m 0644 $deb/copyright "$doc/copyright"
# A native package's changelog, in Debian's format: one entry for this version, pointing at
# the project's own.
printf '%s\n' "wsrunner ($version) unstable; urgency=medium" "" \
    "  * Release $version: CHANGELOG.md.gz beside this file says what changed." "" \
    " -- $maintainer  $(date -u -R -d "@$epoch")" > "$doc/changelog"
gzip -9n "$doc/changelog" "$doc/CHANGELOG.md"
install -d -m 0755 "$stage/usr/share/man/man1"
$py packaging/manpage.py "$(date -u -d "@$epoch" +%F)" | gzip -9n > "$stage/usr/share/man/man1/wsrunner.1.gz"
install -D -m 0644 $deb/lintian-overrides "$stage/usr/share/lintian/overrides/wsrunner"

mkdir -p "$stage/DEBIAN"
sed -e '/^#/d' -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" \
    -e "s/@PYMIN@/$pymin/" -e "s/@PYNEXT@/$pynext/" \
    -e "s/@SIZE@/$(du -sk --exclude=DEBIAN "$stage" | cut -f1)/" $deb/control > "$stage/DEBIAN/control"
install -m 0644 $deb/conffiles "$stage/DEBIAN/conffiles"
sed -e "s/@VERSION@/$version/" -e "s/@BUILD_ID@/$build_id/" $deb/postinst > "$stage/DEBIAN/postinst"
chmod 0755 "$stage/DEBIAN/postinst"
install -m 0755 $deb/prerm $deb/postrm -t "$stage/DEBIAN"
# What `dpkg --verify` checks files against (dpkg-deb does not make it). Conffiles are left
# out, as dh_md5sums does: dpkg keeps their sums itself.
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort \
    | grep -vxF -f <(sed 's|^/||' DEBIAN/conffiles) | xargs -d '\n' md5sum) > "$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/md5sums"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$out/wsrunner_${version}_${arch}.deb" >/dev/null
echo "$pyz"
echo "$out/wsrunner_${version}_${arch}.deb"
