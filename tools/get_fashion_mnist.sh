#!/usr/bin/env bash
# Make sure Fashion-MNIST's four IDX files are installed where dino_sparo looks by default.
# Quiet and a no-op when they are present; otherwise installs Debian's `dataset-fashion-mnist`
# (as root, or through sudo) or says what to do. Usage: tools/get_fashion_mnist.sh
set -euo pipefail

DEST=/usr/share/datasets/fashion-mnist
FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
PROJECT_URL=https://github.com/zalandoresearch/fashion-mnist

have_all() {
    local f
    for f in "${FILES[@]}"; do
        [[ -s "$DEST/$f.gz" || -s "$DEST/$f" ]] || return 1
    done
}

explain() {
    cat >&2 <<EOF
Fashion-MNIST is not installed in $DEST.
Either install the Debian/Ubuntu package:
    sudo apt-get install dataset-fashion-mnist
or download the four files from the Fashion-MNIST project ($PROJECT_URL, data/fashion):
    ${FILES[0]}.gz ${FILES[1]}.gz ${FILES[2]}.gz ${FILES[3]}.gz
into one folder and point the config at it: data.path=/that/folder
EOF
}

if have_all; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    explain
    exit 1
fi

if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "Not root and no sudo: cannot run apt-get." >&2
    explain
    exit 1
fi

echo "Installing dataset-fashion-mnist with apt-get ..." >&2
if ! { "${SUDO[@]}" apt-get update -qq &&
       "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; then
    echo "apt-get could not install dataset-fashion-mnist." >&2
    explain
    exit 1
fi

if ! have_all; then
    echo "dataset-fashion-mnist is installed but the files are not in $DEST." >&2
    explain
    exit 1
fi
echo "Fashion-MNIST installed in $DEST." >&2
