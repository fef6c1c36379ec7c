"""LlipLoss across processes equals one process computing the whole batch, for every --loss-dist-impl.

Each rank keeps its images and exchanges texts as OpenCLIP's SigLipLoss does, then computes its loss in one
call over all W·b texts. With b images per rank and W ranks, every rank's loss is normalised by b, so the ranks'
losses sum to W times the single-process loss over B = W·b, and DDP's gradient average equals the
single-process gradient.
"""
import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from open_clip_llip import LlipLoss

IMPLS = ('bidir', 'shift', 'reduce', 'gather')
PER_RANK = 2


def global_batch(world_size):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(world_size * PER_RANK, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 1000, (world_size * PER_RANK, 16), generator=generator)
    texts[:, 6] = 49407  # EOT, the highest id
    texts[:, 7:] = 0
    return images, texts


def tiny_model():
    torch.manual_seed(0)
    return open_clip.create_model('Llip-Tiny', output_dict=True)


def count_texts_per_call(loss_fn):
    """The number of texts of each call of ``loss_fn._loss``, as a list that fills as it is called."""
    counts, one_call = [], loss_fn._loss

    def counted(image_features, text_features, *args, **kwargs):
        counts.append(text_features.shape[0])
        return one_call(image_features, text_features, *args, **kwargs)

    loss_fn._loss = counted
    return counts


def run_rank(rank, world_size, init_method, out_path):
    dist.init_process_group('gloo', init_method=init_method, rank=rank, world_size=world_size)
    model = tiny_model()
    ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    images, texts = global_batch(world_size)
    local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for impl in IMPLS:
        model.zero_grad()
        loss_fn = LlipLoss(model.mixer.temperature, rank=rank, world_size=world_size, dist_impl=impl)
        texts_per_call = count_texts_per_call(loss_fn)
        loss = loss_fn(**ddp_model(images[local], texts[local]))
        loss.backward()
        losses = [None] * world_size
        dist.all_gather_object(losses, loss.item())
        results[impl] = {'losses': losses, 'grads': {n: p.grad.clone() for n, p in model.named_parameters()},
                         'texts_per_call': texts_per_call}
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


@pytest.mark.parametrize('world_size', [2, 3])
def test_distributed_loss_and_gradients_equal_single_process(world_size, tmp_path):
    out_path = tmp_path / 'ranks.pt'
    mp.spawn(run_rank, args=(world_size, f'file://{tmp_path / "rendezvous"}', str(out_path)), nprocs=world_size)
    results = torch.load(out_path, weights_only=True)

    model = tiny_model()
    loss = LlipLoss(model.mixer.temperature)(**model(*global_batch(world_size)))
    loss.backward()
    for impl in IMPLS:
        ranks = results[impl]
        assert ranks['texts_per_call'] == [world_size * PER_RANK], impl  # one loss call over all texts
        assert sum(ranks['losses']) == pytest.approx(world_size * loss.item(), rel=1e-5), impl
        for name, param in model.named_parameters():
            error = (ranks['grads'][name] - param.grad).abs().max().item()
            assert error <= 1e-5 * param.grad.abs().max().item(), f'{impl}: {name}: max error {error:.3g}'
