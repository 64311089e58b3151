#!/bin/sh
# Install the Debian packages listed in tests/debian-packages.txt that are missing.
# As root: apt-get installs them. Otherwise: print the one command to run, and fail at once.
set -eu
list="${1:-$(dirname "$0")/debian-packages.txt}"
if [ ! -r "$list" ]; then
    echo "cannot read the package list $list" >&2
    exit 2
fi
missing=""
for name in $(sed -e 's/#.*//' "$list"); do
    status=$(dpkg-query -W -f='${Status}' "$name" 2>/dev/null || true)
    case "$status" in
        *"install ok installed"*) ;;
        *) missing="$missing $name" ;;
    esac
done
[ -z "$missing" ] && exit 0
missing="${missing# }"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "The tests need these Debian packages (or your system's equivalents): $missing" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages the tests need; run: sudo apt-get install -y $missing" >&2
    exit 1
fi
echo "installing Debian packages the tests need: $missing"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
