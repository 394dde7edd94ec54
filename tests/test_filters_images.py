"""Image rules: real <img> URLs from the bundled pages, real documents, real COCO photos."""

import copy
import io
from collections import Counter

import pytest
from PIL import Image

from mmcorpus.filters.documents import DocumentConfig, check_decoded_image, check_image_count, filter_image_urls
from mmcorpus.filters.images import url_reject
from mmcorpus.filters.reasons import Reject
from tests.filter_pages import eval_pages, page_image_urls


@pytest.fixture(scope="module")
def pages(shared_data):
    return eval_pages(str(shared_data))


@pytest.fixture(scope="module")
def cfg():
    return DocumentConfig()


@pytest.fixture(scope="module")
def all_img_urls(pages):
    return [u for p in pages.values() for u in page_image_urls(p["html"], p["url"])]


def test_real_page_furniture_is_dropped(all_img_urls, cfg):
    reasons = Counter()
    for url in all_img_urls:
        r = url_reject(url, cfg)
        reasons[r.reason if r else "keep"] += 1
        low = url.lower()
        if not low.startswith(("http://", "https://", "data:")):  # page URL unknown: src stayed relative
            assert r is not None and r.reason == "url_not_allowed", url
            continue
        if low.startswith("data:") or low.split("?")[0].endswith(".svg"):
            assert r is not None and r.reason == "image_url_pattern", url
        if "gravatar.com/avatar" in low or "facebook.com/tr" in low or "vgwort.de" in low:
            assert r is not None and r.reason == "image_url_pattern", url
        if low.split("?")[0].endswith(".gif") and r is None:
            pytest.fail(f"gif kept: {url}")
    assert len(all_img_urls) > 2000
    assert reasons["keep"] > 0.4 * len(all_img_urls)  # most real <img> are kept...
    assert reasons["image_url_pattern"] > 0.2 * len(all_img_urls)  # ...but a page's furniture is not


@pytest.mark.parametrize(
    "url,expected",
    [
        ("https://www.autohaus.de/build/images/tpl/AH-Logo.svg", "image_url_pattern"),
        ("https://abenteuer-astronomie.de/wp-content/uploads/2016/01/logo_aa_big.png", "image_url_pattern"),
        ("https://www.bfs.de/SiteGlobals/StyleBundles/Bilder/Farbschema/icon_lupe.png?__blob=normal", "image_url_pattern"),
        ("https://storage.googleapis.com/cybercook-assets/pixel.gif", "image_url_pattern"),
        ("https://secure.gravatar.com/avatar/ddba770e282b6a88434fc0880ab5d88b?s=48&d=mm&r=g", "image_url_pattern"),
        ("https://www.facebook.com/tr?id=885936884789139&ev=PageView&noscript=1", "image_url_pattern"),
        ("https://pagead2.googlesyndication.com/pagead/show_ads_impl.png", "image_url_pattern"),
        ("https://example.com/static/sprites/sprite-2x.png", "image_url_pattern"),
        ("data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7", "image_url_pattern"),
        ("https://sw1.news/wp-content/uploads/2022/09/111Orte-Schweinfurt.gif", "image_format"),
        ("https://example.com/scan.TIFF", "image_format"),
        ("ftp://example.com/a.jpg", "url_not_allowed"),
        ("/static/images/photo.jpg", "url_not_allowed"),
        ("javascript:void(0)", "url_not_allowed"),
        ("https://img.zeit.de/2019/43/bohren-bis-es-heiss-wird-bild-1/wide__822x462", None),
        ("https://upload.wikimedia.org/wikipedia/commons/thumb/f/fe/Kernel_Machine.svg/220px-Kernel_Machine.svg.png", None),
        ("https://www.zugreiseblog.de/wp-content/uploads/2019/11/DB-Lounge-Frankfurt.JPG", None),
        ("https://cdn.example.org/photos/silicon-valley-skyline.webp", None),  # "icon" inside a word
        ("https://example.com/media/image?id=123", None),  # no extension: format checked after decoding
    ],
)
def test_url_rules(url, expected, cfg):
    r = url_reject(url, cfg)
    assert (r.reason if r else None) == expected


def test_content_images_of_extracted_pages_are_mostly_kept(pages, cfg):
    urls = [u for p in pages.values() for u in p["doc"]["images"] if u is not None]
    kept = [u for u in urls if url_reject(u, cfg) is None]
    assert len(urls) > 50 and len(kept) >= 0.85 * len(urls)


def _doc_with_images(pages, name):
    doc = pages[name]["doc"]
    assert any(i for i in doc["images"]), name
    return copy.deepcopy(doc)


def _texts(doc):
    return [t for t in doc["texts"] if t is not None]


def test_dropping_images_keeps_text_intact(pages, cfg):
    name = next(n for n, p in pages.items() if sum(i is not None for i in p["doc"]["images"]) >= 3)
    doc = _doc_with_images(pages, name)
    content = [i for i in doc["images"] if i is not None]
    texts_before = _texts(doc)
    bad = ["https://www.facebook.com/tr?id=1&ev=PageView", "data:image/png;base64,iVBORw0KGgo=",
           "https://example.com/themes/site/logo.png", "https://example.com/blank.gif"]
    # put a bad image after every text position
    texts, images, infos = [], [], []
    for k, (t, i, info) in enumerate(zip(doc["texts"], doc["images"], doc["image_info"])):
        texts.append(t), images.append(i), infos.append(info)
        if t is not None:
            texts.append(None), images.append(bad[k % len(bad)]), infos.append({"url": bad[k % len(bad)]})
    doc.update(texts=texts, images=images, image_info=infos)
    doc, dropped = filter_image_urls(doc, cfg)
    assert _texts(doc) == texts_before  # every text chunk, unchanged and in order
    assert [i for i in doc["images"] if i is not None] == [u for u in content if url_reject(u, cfg) is None]
    assert {u for u, _ in dropped} >= set(bad) & set(images)
    assert all(isinstance(r, Reject) for _, r in dropped)
    assert len(doc["texts"]) == len(doc["images"]) == len(doc["image_info"])
    assert all((t is None) != (i is None) for t, i in zip(doc["texts"], doc["images"]))
    assert all(info["url"] == i for i, info in zip(doc["images"], doc["image_info"]) if i is not None)


def test_declared_sizes(pages, cfg):
    def good(p):
        return [i for i in p["doc"]["images"] if i is not None and url_reject(i, cfg) is None]

    doc = _doc_with_images(pages, next(n for n, p in pages.items() if len(good(p)) >= 4))
    urls = good({"doc": doc})[:4]
    doc["metadata"] = {"declared_sizes": {urls[0]: (1, 1), urls[1]: [800, 600], urls[2]: {"width": "1000px", "height": "300"},
                                          urls[3]: (100, None)}}
    doc, dropped = filter_image_urls(doc, cfg)
    by_url = {u: r for u, r in dropped}
    assert by_url[urls[0]].reason == "image_declared_size" and "< min 150" in by_url[urls[0]].detail
    assert urls[1] not in by_url and urls[1] in doc["images"]
    assert by_url[urls[2]].reason == "image_declared_size" and "aspect" in by_url[urls[2]].detail
    assert by_url[urls[3]].reason == "image_declared_size"


def test_at_most_n_images(pages, cfg):
    doc = _doc_with_images(pages, next(n for n, p in pages.items() if any(p["doc"]["images"])))
    real = [u for p in pages.values() for u in p["doc"]["images"] if u and url_reject(u, cfg) is None]
    real = list(dict.fromkeys(real))[:40]
    assert len(real) > 30
    text = _texts(doc)[0]
    doc["texts"] = [text] + [None] * len(real) + [text]
    doc["images"] = [None] + real + [None]
    doc["image_info"] = [None] + [{"url": u} for u in real] + [None]
    doc, dropped = filter_image_urls(doc, cfg)
    assert [i for i in doc["images"] if i] == real[:30]  # the first 30 in reading order
    assert [u for u, _ in dropped] == real[30:]
    assert {r.reason for _, r in dropped} == {"image_too_many"}
    assert _texts(doc) == [text, text]
    assert check_image_count(doc, cfg) is doc


def test_image_count(pages, cfg):
    name = next(n for n, p in pages.items() if not any(p["doc"]["images"]))
    doc = copy.deepcopy(pages[name]["doc"])
    r = check_image_count(doc, cfg)
    assert isinstance(r, Reject) and r.reason == "no_images"
    assert check_image_count(doc, DocumentConfig.from_dict({"images": {"min_per_doc": 0}})) is doc


# ---- after fetching: decoded images (real COCO photos) ----


@pytest.fixture(scope="module")
def photo(coco):
    path = sorted((coco / "images").glob("*.jpg"))[0]
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        return {"url": path.as_uri(), "bytes": data, "width": im.width, "height": im.height, "image": im.copy()}


def _encoded(im, fmt, size=None):
    im = im.resize(size) if size else im
    buf = io.BytesIO()
    im.convert("RGB" if fmt != "GIF" else "P").save(buf, format=fmt)
    return {"bytes": buf.getvalue(), "width": im.width, "height": im.height}


def test_decoded_real_photo_is_kept(photo, cfg):
    assert check_decoded_image({k: photo[k] for k in ("url", "bytes", "width", "height")}, cfg) is None
    assert check_decoded_image(_encoded(photo["image"], "PNG"), cfg) is None
    assert check_decoded_image(_encoded(photo["image"], "WEBP"), cfg) is None


def test_decoded_rules(photo, cfg):
    im = photo["image"]
    cases = {
        "image_too_small": _encoded(im, "JPEG", (120, 100)),
        "image_aspect_ratio": _encoded(im, "JPEG", (630, 300)),
        "image_format": _encoded(im, "GIF"),
        "image_too_large": {"width": 30_000, "height": 20_000, "bytes": photo["bytes"]},
        "image_decode_failed": {"width": None, "height": None, "bytes": b"<html>not an image</html>"},
    }
    for expected, info in cases.items():
        r = check_decoded_image(info, cfg)
        assert isinstance(r, Reject) and r.reason == expected, (expected, r)
    assert check_decoded_image({**_encoded(im, "JPEG"), "format": "BMP"}, cfg).reason == "image_format"
    loose = DocumentConfig.from_dict({"images": {"min_side": 64, "max_aspect_ratio": 3.0, "formats": ["jpg", "gif"]}})
    assert check_decoded_image(cases["image_too_small"], loose) is None
    assert check_decoded_image(cases["image_aspect_ratio"], loose) is None
    assert check_decoded_image(cases["image_format"], loose) is None


def _extracted(shared_data, name):
    """The page through the pipeline's extractor, declared sizes included."""
    import gzip
    import json

    from mmcorpus.filters.extract import extract

    base = shared_data / "trafilatura-eval"
    url = json.loads((base / "evaldata.json").read_text())[name]["url"]
    html = gzip.decompress((base / "pages" / f"{name}.gz").read_bytes()).decode("utf-8", "replace")
    texts, images, infos, meta = extract(html, url)
    return {"doc_id": name, "texts": texts, "images": images, "image_info": infos, "metadata": meta}


def test_real_pages_declared_sizes_and_image_cap(shared_data, cfg):
    """Real <img width height> and a real page with more than 30 content images; a real page keeps all."""
    doc, dropped = filter_image_urls(_extracted(shared_data, "buero-hoppe.de.baumgutachten.html"), cfg)
    declared = {u.rsplit("/", 1)[-1]: r.detail for u, r in dropped if r.reason == "image_declared_size"}
    assert declared["vta-symbol.jpg"] == "declared 62x75: side 62 < min 150"  # partner badges, 75 px tall
    assert declared["beratung_sportstaetten.jpg"] == "declared 600x40: side 40 < min 150"  # a banner strip
    doc, dropped = filter_image_urls(_extracted(shared_data, "fincompare.de.firmenwagen.html"), cfg)
    assert [(u.rsplit("/", 1)[-1], r.detail) for u, r in dropped if r.reason == "image_declared_size"] == [
        ("Firmenwagen-1.jpg", "declared 1200x500: aspect ratio 2.40 > max 2.0")]  # srcset 1200w, width/height ratio
    before = _extracted(shared_data, "kath.net-Menschensohn.html")
    doc, dropped = filter_image_urls(copy.deepcopy(before), cfg)
    too_many = [(u, r.detail) for u, r in dropped if r.reason == "image_too_many"]
    content = [u for u in before["images"] if u and url_reject(u, cfg) is None]
    assert len(content) > 30 and [i for i in doc["images"] if i] == content[:30]
    assert [u for u, _ in too_many] == content[30:]
    assert [d for _, d in too_many] == [f"image {31 + k} > max 30 a document" for k in range(len(too_many))]
    assert _texts(doc) == _texts(before)
    doc, dropped = filter_image_urls(_extracted(shared_data, "alacarte.at-purzelbaum.html"), cfg)
    assert dropped == [] and len([i for i in doc["images"] if i]) == 3  # 620 px photos, declared


def test_resized_copies_of_a_real_photo(photo):
    """FetchConfig.image_size: the kept copy re-encoded at the asked size in each mode; bad bytes are a reject."""
    from mmcorpus.filters.imageinfo import resize_image

    data = photo["bytes"]
    w, h = Image.open(io.BytesIO(data)).size
    for mode, fmt, expected in (("keep_ratio", "jpg", 64 / min(w, h)), ("keep_ratio_largest", "png", 64 / max(w, h)),
                                ("center_crop", "webp", None)):
        out = Image.open(io.BytesIO(resize_image(data, 64, mode, fmt)))
        assert out.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
        assert out.size == ((64, 64) if expected is None else (round(w * expected), round(h * expected)))
    assert resize_image(b"not an image", 64).reason == "image_decode_failed"
