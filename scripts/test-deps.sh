#!/usr/bin/env bash
# System packages the test suite runs against, installed only when missing (Debian/Ubuntu apt):
#   chromium    — tests/web/test_web_page.py drives a real headless browser
#   postgresql  — tests start a throwaway cluster from its binaries (tests/pg.py); the system
#                 service is never started (policy-rc.d forbids it during the install)
set -uo pipefail
sudo=(); [[ "$(id -u)" != 0 ]] && sudo=(sudo -n)
missing=()
[[ -x /usr/bin/chromium ]] || command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[[ ${#missing[@]} == 0 ]] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "please install: ${missing[*]} (the web and database tests need them)" >&2
    exit 0
fi
policy=/usr/sbin/policy-rc.d
had_policy=0; [[ -e $policy ]] && had_policy=1
if [[ $had_policy == 0 ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null && "${sudo[@]}" chmod +x "$policy"
fi
echo "installing test dependencies: ${missing[*]}" >&2
{ "${sudo[@]}" apt-get update -qq \
    && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
    || echo "could not install ${missing[*]}: the tests that need them will fail with a message saying so" >&2
[[ $had_policy == 0 ]] && "${sudo[@]}" rm -f "$policy"
exit 0
