#!/usr/bin/env bash
# Fetch onnxruntime's C/C++ headers, which the onnxruntime wheel lacks: download Debian trixie's
# libonnxruntime-dev (onnxruntime 1.21) from the Debian mirror this machine's apt already uses,
# and unpack it into <out>/root (headers in <out>/root/usr/include/onnxruntime).
# Usage: fetch_ort_headers.sh <out>. Called by cmake/OrtHeaders.cmake.
#
# apt runs with a private source list, index, cache and pin configuration under <out>/apt, so the
# system's apt state is read (keyrings, proxy settings) but never changed; no root needed.
set -euo pipefail
out=$1
package=libonnxruntime-dev suite=trixie
default_keyring=/usr/share/keyrings/debian-archive-keyring.gpg

# Print "URI KEYRING" for each enabled deb source of a release suite (no '-updates'/'-security'),
# in apt's order: deb822 *.sources files, then one-line sources.list entries. KEYRING is '-' when
# the source names no keyring file.
candidate_sources() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk 'BEGIN { RS = ""; FS = "\n" }  # one deb822 stanza per record, one field per line
        {
            types = uris = suites = keyring = ""; enabled = "yes"
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^[#[:space:]]/) continue  # comments, continuation lines (inline keys)
                key = tolower($i); sub(/:.*/, "", key)
                value = $i; sub(/^[^:]*:[[:space:]]*/, "", value)
                if (key == "types") types = value
                else if (key == "uris") uris = value
                else if (key == "suites") suites = value
                else if (key == "signed-by") keyring = value
                else if (key == "enabled") enabled = tolower(value)
            }
            if (enabled == "no" || (" " types " ") !~ / deb /) next
            split(uris, uri, /[[:space:]]+/); n = split(suites, suite, /[[:space:]]+/)
            for (j = 1; j <= n; j++)
                if (suite[j] != "" && suite[j] !~ /-/) { print uri[1], (keyring ~ /^\//) ? keyring : "-"; next }
        }' "$f"
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '
        $1 == "deb" {  # deb [option=value ...] URI SUITE COMPONENT...
            keyring = "-"; i = 2
            if ($2 ~ /^\[/) for (; i <= NF; i++) {
                if ($i ~ /signed-by=/) { keyring = $i; sub(/.*signed-by=/, "", keyring); sub(/\]$/, "", keyring) }
                if ($i ~ /\]$/) { i++; break }
            }
            if ($(i + 1) !~ /-/) print $i, keyring
        }'
}

# Download the package from one mirror into $apt_dir; fails if the mirror does not have it.
download_from() {
    local uri=$1 keyring=$2 signed_by=""
    [ "$keyring" = - ] && [ -r "$default_keyring" ] && keyring=$default_keyring
    [ "$keyring" != - ] && signed_by="[signed-by=$keyring] "
    rm -rf "$apt_dir" && mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/empty"
    echo "deb ${signed_by}${uri} $suite main" > "$apt_dir/sources.list"
    local options=(
        -o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=$apt_dir/empty"
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
        -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=              # no binary caches
        -o Dir::Etc::preferences=/dev/null -o "Dir::Etc::preferencesparts=$apt_dir/empty"  # no pins
        -o APT::Sandbox::User=root     # as root, don't drop to _apt: it cannot write $apt_dir
        -o Acquire::Languages=none -q
    )
    apt-get "${options[@]}" update && (cd "$apt_dir" && apt-get "${options[@]}" download "$package")
}

command -v apt-get > /dev/null && command -v dpkg-deb > /dev/null || {
    echo "onnxq: apt-get and dpkg-deb are needed to fetch the onnxruntime headers (Debian/Ubuntu only)" >&2
    exit 1
}
apt_dir=$out/apt
found=0
while read -r uri keyring; do
    found=1
    echo "onnxq: fetching onnxruntime headers ($package, Debian $suite) from $uri ..."
    if download_from "$uri" "$keyring"; then
        rm -rf "$out/root" && dpkg-deb -x "$apt_dir"/"$package"_*.deb "$out/root"
        rm -rf "$apt_dir"  # the ~10 MB package index is not needed any more
        echo "onnxq: onnxruntime headers unpacked into $out/root"
        exit 0
    fi
    echo "onnxq: could not download $package from $uri" >&2
done < <(candidate_sources)
[ "$found" = 1 ] || echo "onnxq: found no Debian 'deb' source in /etc/apt/sources.list{,.d/*.list,.d/*.sources}" >&2
exit 1
