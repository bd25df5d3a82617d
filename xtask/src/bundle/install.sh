#!/bin/sh
# Stella offline installer (POSIX sh). Picks the agent binary of this bundle
# for this machine's architecture and hands over to `stella-agent install`,
# which verifies the bundle's signature before it writes anything.
# Arguments are passed on, e.g. `sh install.sh --prefix /mnt/image`.
set -eu

# The bundle is the directory this script is in.
case $0 in
  */*) bundle=${0%/*} ;;
  *) bundle=. ;;
esac
bundle=$(cd -- "$bundle" && pwd -P)

os=$(uname -s)
if [ "$os" != Linux ]; then
  echo "install.sh: this bundle is for Linux, not $os" >&2
  exit 1
fi

machine=$(uname -m)
case $machine in
  x86_64 | amd64) target=x86_64-unknown-linux-musl ;;
  aarch64 | arm64) target=aarch64-unknown-linux-musl ;;
  *)
    echo "install.sh: unsupported architecture \"$machine\" (uname -m): this bundle has agents for x86_64 and aarch64 only" >&2
    exit 1
    ;;
esac

agent=$bundle/$target/stella-agent
if [ ! -f "$agent" ]; then
  echo "install.sh: $agent is missing: the bundle is incomplete" >&2
  exit 1
fi
if [ ! -x "$agent" ]; then
  echo "install.sh: $agent is not executable (a noexec mount?): copy the bundle to a local disk, or extract its .tar there, and run install.sh from it" >&2
  exit 1
fi
exec "$agent" install --bundle "$bundle" "$@"
