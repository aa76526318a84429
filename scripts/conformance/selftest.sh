#!/usr/bin/env bash
# Unit test of the conformance parser and checker on a hand-written sample of iscsi-test-cu
# output (tests/conformance/fixtures). Run by scripts/test.sh.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
fixtures=$here/../../tests/conformance/fixtures
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
    echo "conformance selftest: $*" >&2
    exit 1
}

# The parser gives every listed test of -t ALL its verdict, in order.
awk -f "$here/parse.awk" "$fixtures/list.txt" "$fixtures/output.txt" >"$tmp/results" 2>"$tmp/err"
diff -u "$fixtures/results.txt" "$tmp/results" || fail "parse.awk: wrong verdicts"
grep -qx "not run: ProutReserve.Simple" "$tmp/err" || fail "parse.awk: did not report a test not run"

# The checker: CompareAndWrite.Miscompare skips in a required family, unlisted: a regression.
if "$here/check.sh" "$tmp/results" "$fixtures/expected-not-passing.txt" >"$tmp/out"; then
    fail "check.sh: accepted an unlisted skip in a required family"
fi
grep -qx "REGRESSION: CompareAndWrite.Miscompare skipped in a required family" "$tmp/out" ||
    fail "check.sh: did not name the regression"
grep -qx "skipped (allowed outside the required families): Sanitize.BlockErase" "$tmp/out" ||
    fail "check.sh: did not report the allowed skip"
[[ $(tail -n 1 "$tmp/out") == "4 passed, 4 failed, 2 skipped" ]] ||
    fail "check.sh: wrong summary: $(tail -n 1 "$tmp/out")"

# Listing it makes the run pass.
cp "$fixtures/expected-not-passing.txt" "$tmp/expected"
echo "CompareAndWrite.Miscompare skip" >>"$tmp/expected"
"$here/check.sh" "$tmp/results" "$tmp/expected" >"$tmp/out" || fail "check.sh: rejected a complete list"

# An unlisted failure is a regression.
grep -v "^GetLBAStatus" "$tmp/expected" >"$tmp/expected2"
if "$here/check.sh" "$tmp/results" "$tmp/expected2" >"$tmp/out"; then
    fail "check.sh: accepted an unlisted failure"
fi
grep -qx "REGRESSION: GetLBAStatus.BeyondEol failed" "$tmp/out" || fail "check.sh: did not name the failure"

# A listed test that now passes makes the list stale.
echo "WriteSame10.UnmapVPD fail" >>"$tmp/expected"
if "$here/check.sh" "$tmp/results" "$tmp/expected" >"$tmp/out"; then
    fail "check.sh: accepted a stale list"
fi
grep -q "^STALE: WriteSame10.UnmapVPD is listed as fail but now is pass" "$tmp/out" ||
    fail "check.sh: did not name the stale entry"

# The reservation families (issue 3) are required too: a skip there is a regression.
printf 'PrinReadKeys.Simple skip\nReserve6.Simple pass\n' >"$tmp/results2"
: >"$tmp/empty"
if "$here/check.sh" "$tmp/results2" "$tmp/empty" >"$tmp/out"; then
    fail "check.sh: accepted a skip in PrinReadKeys"
fi
grep -qx "REGRESSION: PrinReadKeys.Simple skipped in a required family" "$tmp/out" ||
    fail "check.sh: did not name the PrinReadKeys skip"

# select.awk: one line per suite of ALL, in order; a suite holding an isolated test is split into
# its other tests, and the isolated test is left out (conformance.sh runs it on its own).
printf '%s\n' ALL ALL.A ALL.A.X ALL.iSCSITMF ALL.iSCSITMF.AbortTaskSimpleAsync \
    ALL.iSCSITMF.LUNResetSimpleAsync ALL.B ALL.B.Y SCSI SCSI.A SCSI.A.X >"$tmp/list"
awk -v isolated="iSCSITMF.LUNResetSimpleAsync" -f "$here/select.awk" "$tmp/list" >"$tmp/selected"
printf '%s\n' ALL.A ALL.iSCSITMF.AbortTaskSimpleAsync ALL.B | diff -u - "$tmp/selected" ||
    fail "select.awk: wrong test list"
awk -v only=B -v isolated="iSCSITMF.LUNResetSimpleAsync" -f "$here/select.awk" "$tmp/list" \
    >"$tmp/selected"
[[ $(cat "$tmp/selected") == ALL.B ]] || fail "select.awk: wrong test list for one family"

# parse.awk over several runs: each file is a run of its own, so a run that died before a
# test's verdict leaves that test without one (fail, not run), whatever the next run prints.
printf 'Suite: A\n  Test: X ...    [SKIPPED] LUN is not removable. Skipping test.\npassed\n' \
    >"$tmp/run1"
printf '  Test: Y ...    WRITE10 queued\n' >>"$tmp/run1"
printf 'preamble\npassed\nSuite: iSCSITMF\n  Test: LUNResetSimpleAsync ...FAILED\n' >"$tmp/run2"
printf '%s\n' ALL ALL.A ALL.A.X ALL.A.Y ALL.iSCSITMF ALL.iSCSITMF.LUNResetSimpleAsync >"$tmp/list2"
awk -f "$here/parse.awk" "$tmp/list2" "$tmp/run1" "$tmp/run2" >"$tmp/results3" 2>"$tmp/err"
printf '%s\n' "A.X skip" "A.Y fail" "iSCSITMF.LUNResetSimpleAsync fail" |
    diff -u - "$tmp/results3" || fail "parse.awk: wrong verdicts over two runs"
grep -qx "not run: A.Y" "$tmp/err" || fail "parse.awk: did not report A.Y as not run"

echo "conformance selftest: ok"
