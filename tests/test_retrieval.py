"""Retrieval: conditioned scores in blocks against plain Llip, and recall/rank metrics against a plain count."""
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import batching_atol

from open_clip_llip import encode_images, encode_texts, evaluate_retrieval, retrieval_metrics, unpack_image


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return open_clip.create_model('Llip-Tiny').eval()


def random_texts(model, m, generator):
    texts = torch.randint(1, 1000, (m, model.context_length), generator=generator)
    texts[:, 6] = model.vocab_size - 1  # EOT: the highest id
    texts[:, 7:] = 0
    return texts


@pytest.fixture(scope='module')
def embedded(model):
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(7, 3, 32, 32, generator=generator), random_texts(model, 11, generator)
    return images, texts, encode_images(model, images.split(3)), encode_texts(model, texts.split(4))


def plain_cosine(model, images, texts, tau):
    """Materialise z[i|j] (docs/method.md, The mixer) and take its cosine with t[j]."""
    with torch.no_grad():
        keys, values = unpack_image(model.encode_image(images))
        features, queries = model.embed_text(texts)
        z = model.mixer(keys, values, queries, temperature=tau)  # [N, M, D]
        return F.cosine_similarity(z, features[None], dim=-1)


def test_encoders_concatenate_batches(model, embedded):
    images, texts, image_features, text_features = embedded
    with torch.no_grad():  # batches of 3 (4) against one of 7 (11): round-off bounded in batching_atol
        whole_images, whole_texts = model.encode_image(images), model.encode_text(texts)
        torch.testing.assert_close(image_features, whole_images, rtol=0, atol=batching_atol(model, whole_images))
        torch.testing.assert_close(text_features, whole_texts, rtol=0, atol=batching_atol(model, whole_texts))


@pytest.mark.parametrize('batches', ['tuple', 'generator', 'loader', 'loader of a dataset that says too many'])
def test_encoders_give_each_batch_in_order_whatever_says_how_many_rows_come(model, embedded, batches):
    """The encoders write batches into one buffer, sized from what ``batches`` says or grown as they come."""
    images, texts, _, _ = embedded
    with torch.no_grad():  # the same batches through the same kernels: equal to the bit
        expected_images = torch.cat([model.encode_image(x) for x in images.split(3)])
        expected_texts = torch.cat([model.encode_text(t) for t in texts.split(4)])

    def make(tensor, size):
        if batches == 'tuple':
            return tensor.split(size)
        if batches == 'generator':
            return (batch for batch in tensor.split(size))
        dataset = list(tensor) if batches == 'loader' else TooLong(tensor)
        return torch.utils.data.DataLoader(dataset, batch_size=size)
    assert torch.equal(encode_images(model, make(images, 3)), expected_images)
    assert torch.equal(encode_texts(model, make(texts, 4)), expected_texts)


class TooLong(torch.utils.data.IterableDataset):
    """An iterable dataset whose ``len`` says more rows than it gives."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return 2 * len(self.rows)


def test_encoders_refuse_no_batches(model):
    with pytest.raises(ValueError, match='No images to encode'):
        encode_images(model, [])
    with pytest.raises(ValueError, match='No texts to encode'):
        encode_texts(model, iter(()))


@pytest.mark.parametrize('gram_block', [None, 32 * 32, 3 * 32 * 32])  # images per block: default, 1, 3
@pytest.mark.parametrize('tau', [None, 1.])
def test_blocked_scores_match_materialised_z(model, embedded, gram_block, tau, monkeypatch):
    import open_clip_llip.modeling.llip_model as llip_model
    images, texts, image_features, text_features = embedded
    if gram_block:
        monkeypatch.setattr(llip_model, '_GRAM_BLOCK_ELEMENTS', gram_block)
    with torch.no_grad():
        scores = model.similarity(image_features, text_features, temperature=tau)
    expected = plain_cosine(model, images, texts, model.mixer.temperature if tau is None else tau)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def plain_metrics(scores, image_index):
    """Rank by sorting (ties broken against the right answer) and count, one query at a time."""
    scores, image_index = scores.tolist(), image_index.tolist()
    num_images, num_texts = len(scores), len(image_index)
    metrics = {}

    def add(name, ranks):
        ranks = np.array(ranks)
        metrics[f'{name}_mean_rank'] = ranks.mean() + 1
        metrics[f'{name}_median_rank'] = np.floor(np.median(ranks)) + 1
        for k in (1, 5, 10):
            metrics[f'{name}_R@{k}'] = np.mean(ranks < k)

    image_ranks = []
    for i in range(num_images):
        # sort by score, and among equal scores put wrong captions first
        order = sorted(range(num_texts), key=lambda j: (-scores[i][j], image_index[j] == i))
        image_ranks.append(min(r for r, j in enumerate(order) if image_index[j] == i))
    add('image_to_text', image_ranks)
    text_ranks = []
    for j in range(num_texts):
        order = sorted(range(num_images), key=lambda i: (-scores[i][j], i == image_index[j]))
        text_ranks.append(order.index(image_index[j]))
    add('text_to_image', text_ranks)
    return metrics


def test_metrics_with_several_captions_per_image():
    scores = torch.tensor([
        # captions of: 0    0    1    2    2    2
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],  # image 0: its best caption is first
        [0.5, 0.6, 0.4, 0.1, 0.1, 0.1],  # image 1: its only caption is third
        [0.1, 0.2, 0.3, 0.0, 0.0, 0.7],  # image 2: its third caption is first
    ])
    image_index = torch.tensor([0, 0, 1, 2, 2, 2])
    metrics = retrieval_metrics(scores, image_index)
    assert metrics['image_to_text_R@1'] == pytest.approx(2 / 3)
    assert metrics['image_to_text_mean_rank'] == pytest.approx((1 + 3 + 1) / 3)
    # text→image: ranks of the right image per column: 1, 3, 2, 3, 3, 1
    assert metrics['text_to_image_R@1'] == pytest.approx(2 / 6)
    assert metrics['text_to_image_median_rank'] == 2  # OpenCLIP's: floor(median of 0-based ranks) + 1
    assert metrics == pytest.approx(plain_metrics(scores, image_index))


def test_ties_count_against():
    scores = torch.zeros(4, 8)  # every pair tied
    image_index = torch.arange(8) % 4
    metrics = retrieval_metrics(scores, image_index)
    assert metrics['image_to_text_R@1'] == 0 and metrics['image_to_text_R@5'] == 0 and metrics['image_to_text_R@10'] == 1
    assert metrics['text_to_image_R@1'] == 0 and metrics['text_to_image_R@5'] == 1
    assert metrics['image_to_text_mean_rank'] == 7 and metrics['text_to_image_mean_rank'] == 4
    assert metrics == pytest.approx(plain_metrics(scores, image_index))


@pytest.mark.parametrize('seed', range(3))
def test_metrics_match_plain_count_on_random_scores(seed):
    generator = torch.Generator().manual_seed(seed)
    num_images, num_texts = 30, 70
    extra = torch.randint(0, num_images, (num_texts - num_images,), generator=generator)
    image_index = torch.cat([torch.arange(num_images), extra])
    image_index = image_index[torch.randperm(num_texts, generator=generator)]
    scores = torch.randint(0, 12, (num_images, num_texts), generator=generator).float()  # many ties
    metrics = retrieval_metrics(scores, image_index)
    assert set(metrics) == {f'{d}_{m}' for d in ('image_to_text', 'text_to_image')
                            for m in ('R@1', 'R@5', 'R@10', 'mean_rank', 'median_rank')}
    assert metrics == pytest.approx(plain_metrics(scores, image_index))


def full_matrix_metrics(scores, image_index):
    """The metrics from [N, M] masks and comparisons of the whole matrix at once (as ``retrieval_metrics`` computed
    them before it ranked in blocks): the reference its blocks must equal exactly."""
    from open_clip_llip.evaluation.retrieval import _rank_metrics
    scores = scores.float()
    is_caption = image_index[None, :] == torch.arange(len(scores))[:, None]
    best_caption = scores.masked_fill(~is_caption, float('-inf')).amax(dim=1, keepdim=True)
    image_ahead = ((~(scores < best_caption)) & ~is_caption).sum(dim=1)
    text_ahead = ((~(scores < scores.gather(0, image_index[None, :]))) & ~is_caption).sum(dim=0)
    return {**_rank_metrics('image_to_text', image_ahead), **_rank_metrics('text_to_image', text_ahead)}


@pytest.mark.parametrize('block_elements', [1, 70, 3 * 70, 29 * 70, 1 << 22])  # images per block: 1, 1, 3, 29, all
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_metrics_ranked_in_blocks_equal_the_full_matrix_exactly(block_elements, dtype, monkeypatch):
    import open_clip_llip.evaluation.retrieval as retrieval
    monkeypatch.setattr(retrieval, '_RANK_BLOCK_ELEMENTS', block_elements)
    generator = torch.Generator().manual_seed(0)
    num_images, num_texts = 30, 70
    image_index = torch.cat([torch.arange(num_images), torch.randint(0, num_images, (40,), generator=generator)])
    image_index = image_index[torch.randperm(num_texts, generator=generator)]
    tied = torch.randint(0, 12, (num_images, num_texts), generator=generator).float()
    close = torch.randn(num_images, num_texts, generator=generator)  # distinct in float32, some tied once rounded
    with_nan = close.clone()
    with_nan[3, :5], with_nan[7, 9] = float('nan'), float('nan')
    for scores in (tied, close, with_nan):
        assert retrieval_metrics(scores.to(dtype), image_index) == full_matrix_metrics(scores.to(dtype), image_index)


def test_similarity_fills_its_blocks_with_the_scores_of_conditioned_cosine_exactly(model, embedded, monkeypatch):
    """Blocks of images and texts written into one matrix: bit for bit the blocks' concatenation, at every τ."""
    import open_clip_llip.modeling.llip_model as llip_model
    from open_clip_llip.modeling.features import unpack_text
    from open_clip_llip.modeling.scoring import conditioned_cosine
    _, _, image_features, text_features = embedded
    monkeypatch.setattr(llip_model, '_GRAM_BLOCK_ELEMENTS', 3 * 32 * 32)  # 3 images per block
    monkeypatch.setattr(llip_model, 'pair_block_size', lambda count, heads, tokens: 4)  # 4 texts per block
    with torch.no_grad():
        scores = model.similarity(image_features, text_features, temperature=[1., 5.])
        keys, values = unpack_image(image_features)
        queries, targets = unpack_text(text_features)
        gram = model.mixer.image_gram(values)
        for t, tau in enumerate((1., 5.)):
            expected = torch.cat([conditioned_cosine(keys[i:i + 3], values[i:i + 3], gram[i:i + 3], queries, targets, tau,
                                                     block_size=4) for i in range(0, 7, 3)])
            assert torch.equal(scores[t], expected)


def test_metrics_agree_with_openclip_without_ties():
    from open_clip_train.train import get_clip_metrics
    generator = torch.Generator().manual_seed(0)
    image_features = F.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    text_features = F.normalize(image_features + 0.5 * torch.randn(40, 8, generator=generator), dim=-1)
    ours = retrieval_metrics(image_features @ text_features.T, torch.arange(40))
    theirs = {k: float(v) for k, v in get_clip_metrics(image_features, text_features, torch.tensor(1.)).items()}
    assert ours == pytest.approx(theirs)


def test_evaluate_retrieval_for_several_temperatures(model, embedded):
    images, texts, image_features, text_features = embedded
    image_index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 0, 3, 5])
    with torch.no_grad():
        results = evaluate_retrieval(model, image_features, text_features, image_index, temperatures=[1, 10])
    assert list(results) == [1., 10.]
    for tau, metrics in results.items():
        assert metrics == pytest.approx(plain_metrics(plain_cosine(model, images, texts, tau), image_index))
    default = evaluate_retrieval(model, image_features[:5], text_features[:5])
    assert list(default) == [model.mixer.temperature]
    assert default[model.mixer.temperature] == pytest.approx(
        plain_metrics(plain_cosine(model, images[:5], texts[:5], model.mixer.temperature), torch.arange(5)))


@pytest.mark.parametrize('image_index, message', [
    (torch.tensor([0, 0, 2]), r'images \[1\] have none'),
    (torch.tensor([0, 1]), r'one image per text: shape \[3\]'),
    (torch.tensor([0, 1, 3]), r'image numbers in \[0, 3\)'),
])
def test_bad_image_index(image_index, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(torch.zeros(3, 3), image_index)
