#!/usr/bin/env bash
# Set up PedX-Ray on a fresh Debian/Ubuntu machine: system packages the tests and demo need
# (Orthanc and its DICOMweb plugin as the PACS, dcmtk as the reference DICOM tools, headless Chromium and its WebDriver for
# the serving web page's test) and a virtualenv at .venv with the
# project installed editable. Idempotent: a second run checks and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
# Orthanc's DICOMweb plugin: the QIDO-RS/WADO-RS server the DICOMweb pull is tested against
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v findscu >/dev/null 2>&1 || need_apt+=(dcmtk)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
# glymur (reduced-resolution JPEG 2000 decode) binds the system OpenJPEG library
# (not grep -q: under pipefail its early exit fails ldconfig with SIGPIPE)
ldconfig -p 2>/dev/null | grep "libopenjp2.so" >/dev/null || need_apt+=(libopenjp2-7)
if ((${#need_apt[@]})); then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # The package starts a system-wide Orthanc on 4242/8042; the project runs its own on free ports.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
        $SUDO systemctl stop orthanc || true
    fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Reinstall only when the dependency list changed.
stamp=.venv/.pedx-ray-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the project into .venv (first run takes a few minutes)"
    # pip warns about every local index location it cannot use; those lines are noise here.
    .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v 'is ignored: it is neither' || true
    .venv/bin/python -m pip install -q -e '.[dev]' 2>&1 | grep -v 'is ignored: it is neither' || true
    .venv/bin/python -c 'import ingest, ray, torch, pydicom, pynetdicom' \
        || { echo "setup: the install failed (see the pip output above)" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
echo "setup: ready (.venv, Orthanc $(Orthanc --version 2>/dev/null | head -1 | awk '{print $NF}'), dcmtk $(findscu --version 2>/dev/null | grep -o 'v[0-9.]*' | head -1))"
