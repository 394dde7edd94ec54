#!/usr/bin/env bash
# Set up mmcorpus and run every job on the bundled real data in ../shared/data, offline, into demo-out/.
#   interleaved: real Common Crawl WARCs, broken test WARCs and trafilatura's evaluation pages -> cleaned
#                documents, with a small opt-out list and blocklist applied (no image fetching: the pages' image hosts are not reachable offline), under the
#                direct runner and again under Dask (same files); then photo-story pages built
#                from the COCO photos and captions, served on 127.0.0.1 and crawled from a URL list with
#                their images fetched (img2dataset), under the Dask runner, each image scored by an NSFW
#                head over its CLIP embedding (both random here: the demo shows the stage, not real scores)
#   pairs:       COCO photos with their human captions -> CLIP scores, exact + pHash dedup
#   capfilt:     synthetic captions + ITM filter over those pairs
#   train:       a small Flamingo on the photo stories + pairs + CapFilt mixture (Flamingo's M3W 1.0 /
#                ALIGN 0.2 / LTIP 0.2 weights), with its informativeness report
#   export:      pairs and photo stories as WebDataset tars and Hugging Face folders, read back
#   card:        a dataset card per output
# No model hub is reachable, so every model runs from a tiny config with random weights
# (--allow-random-weights; the stats, cards and report say so). Scores and captions are therefore noise;
# the data flow, counts, rejects and cards are real. Pass real weights to get real scores.
set -euo pipefail
cd "$(dirname "$0")"
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DATA=${MMCORPUS_DATA:-../shared/data}
OUT=${1:-demo-out}
if [ ! -d "$DATA/coco-mini" ]; then
  echo "demo.sh: bundled data not found at $DATA (set MMCORPUS_DATA)" >&2
  exit 2
fi
if [ ! -x .venv/bin/mmcorpus ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
fi
MM=.venv/bin/mmcorpus
mkdir -p "$OUT"
step() { echo; echo "== $*"; }

# Common Crawl samples, WARCs with broken records on purpose (warcio's and resiliparse's test files: their bad
# records become rejects with a reason) and trafilatura's evaluation pages.
WEB=("$DATA"/cc-whirlwind "$DATA"/dolma-cc-warc "$DATA"/resiliparse-warcs "$DATA"/warcio-samples
     "$DATA"/trafilatura-eval/pages)
# Safety: a small opt-out list and blocklist (demo/optout.txt, demo/blocklist.txt); noai/noimageai page
# directives and PII masking are on by default. The card's "Safety and opt-outs" section reports them.
SAFETY=(--opt-out-list demo/optout.txt --blocklist demo/blocklist.txt)
step "interleaved documents from WARCs and HTML pages"
$MM interleaved "${WEB[@]}" --no-images --emit-m3w-text "${SAFETY[@]}" --output "$OUT/interleaved" --overwrite

step "the same documents under Beam's DirectRunner (the default with 2 workers is a local Dask cluster)"
$MM interleaved "${WEB[@]}" --no-images --runner direct --workers 1 "${SAFETY[@]}" --output "$OUT/interleaved-direct" \
  --overwrite
.venv/bin/python demo/same_output.py "$OUT/interleaved" "$OUT/interleaved-direct"

step "tiny model configs for the offline run"
.venv/bin/python demo/tiny_models.py "$OUT/models" "$DATA/coco-mini" "$OUT/stories" "$OUT/pairs" "$OUT/capfilt"

step "photo-story pages served on 127.0.0.1, crawled with their images (Dask runner)"
PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -rf "$OUT/site"
.venv/bin/python demo/photo_pages.py "$DATA/coco-mini" "$OUT/site" "$OUT/photo-stories.txt" "http://127.0.0.1:$PORT"
.venv/bin/python -m http.server "$PORT" --bind 127.0.0.1 --directory "$OUT/site" > /dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
sleep 1
# NSFW: a random head over a random tiny CLIP (--allow-random-weights; stats and card say the scores mean
# nothing). Each photo is embedded once and gets image_info.nsfw_score. The random scores of the coco-mini photos
# fall between 0.10 and 0.16, so the thresholds sit there to show both decisions (about a tenth of the images
# dropped, and the documents holding one of the top few); with real weights start from --nsfw-threshold 0.5.
$MM interleaved "$OUT/photo-stories.txt" --allow-private-network --config demo/stories.yaml --runner dask \
  --nsfw-head random --clip-model "$OUT/models/clip-tiny.json" --allow-random-weights \
  --nsfw-threshold 0.14 --nsfw-document-threshold 0.155 --output "$OUT/stories" --overwrite
kill $SERVER 2>/dev/null || true

step "image-text pairs from COCO photos and captions"
$MM pairs coco-mini="$DATA/coco-mini" --allow-random-weights --output "$OUT/pairs" --overwrite

step "BLIP CapFilt over the pairs"
# a random ITM head scores every caption about the same (0.44 here), so no threshold would mean anything:
# the demo keeps every caption (--itm-threshold 0); with real weights keep BLIP's default of 0.5
$MM capfilt "$OUT/pairs" --captioner "$OUT/models/blip" --itm "$OUT/models/blip" --allow-random-weights \
  --itm-threshold 0 --output "$OUT/capfilt" --overwrite

step "train a compact Flamingo on the mixture"
rm -rf "$OUT/train"
$MM train --config "$OUT/models/train.yaml" --output "$OUT/train" --allow-random-weights

step "export pairs and photo stories to WebDataset tars and Hugging Face folders, read back"
for NAME in pairs stories; do
  $MM export "$OUT/$NAME" --format webdataset --samples-per-shard 100 --output "$OUT/export/$NAME/webdataset" --overwrite
  $MM export "$OUT/$NAME" --format hf --samples-per-shard 100 --output "$OUT/export/$NAME/hf" --overwrite
done
.venv/bin/python demo/read_exports.py "$OUT/pairs" "$OUT/export/pairs" "$OUT/stories" "$OUT/export/stories"

step "dataset cards"
$MM card "$OUT/interleaved" --name mmcorpus-demo-interleaved \
  --description "Documents from Common Crawl WARC samples and trafilatura's evaluation pages."
sed -n '/^## Safety and opt-outs/,/^## Limitations/p' "$OUT/interleaved/README.md" | head -n -1
$MM card "$OUT/stories" --name mmcorpus-demo-photo-stories --train-report "$OUT/train/report.json" \
  --description "Photo-story pages built from COCO photos and captions, crawled over HTTP with their images."
sed -n '/^## Safety and opt-outs/,/^## Limitations/p' "$OUT/stories/README.md" | head -n -1
$MM card "$OUT/pairs" --name mmcorpus-demo-pairs --train-report "$OUT/train/report.json" \
  --description "COCO photos with their human captions (CLIP scores from random weights)."
$MM card "$OUT/capfilt" --name mmcorpus-demo-capfilt --train-report "$OUT/train/report.json" \
  --description "CapFilt over the demo pairs (random-weight captioner and filter)."

step "done"
$MM inspect "$OUT/stories" -n 1 --max-chars 600
echo
echo "outputs in $OUT/: interleaved/ stories/ pairs/ capfilt/ (data/, rejects/, stats.json, README.md card), train/report.json,"
echo "  export/{pairs,stories}/{webdataset,hf}/"
