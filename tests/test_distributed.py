"""Llip trains across processes as one process over the whole batch: OpenCLIP's loop under torchrun on the CPU
(gloo), and the loop's loss with every --loss-dist-impl.

Each rank keeps its images and exchanges texts as OpenCLIP's SigLipLoss does, then computes its loss in one
call over all W·b texts. With b images per rank and W ranks, every rank's loss is normalised by b, so the ranks'
losses sum to W times the single-process loss over B = W·b, and DDP's gradient average equals the
single-process gradient.
"""
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import EPS32, batching_atol
from open_clip_train import distributed  # noqa: F401  (as in the loop: the cpu_distributed adapter applies once it loads)
from open_clip_train.data import SyntheticDataset
from torch.nn.parallel import DistributedDataParallel

from open_clip_llip import LlipModel
from open_clip_llip.integration.adapters import cpu_distributed

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
    torch.manual_seed(0)  # as open_clip_train.main's random_seed(0) before it builds the model
    return open_clip.create_model('Llip-Tiny', output_dict=True)


def unbiased_tiny_model():
    """Llip-Tiny with logit bias 0: at its initial −10 a negative pair's term, about e^(s − 10), is too small for a
    missing or doubled negative to show past round-off."""
    model = tiny_model()
    with torch.no_grad():
        model.logit_bias.zero_()
    return model


def loop_loss(model, rank=0, world_size=1, impl=None):
    """The loss open_clip_train builds for a Llip model: ``create_loss(args)`` (3.3) or its task's (4)."""
    args = SimpleNamespace(model='Llip-Tiny', rank=rank, world_size=world_size, loss_dist_impl=impl, siglip=False,
                           distill=False, horovod=False, fsdp=False, use_naflex=False)
    if hasattr(open_clip, 'create_task'):
        return open_clip.create_task(args, model).loss
    return open_clip.create_loss(args)


def loss_atol(model, batch_size: int) -> float:
    """How far round-off may move the loss of ``batch_size`` images computed in other batches.

    Each image's term sums −log σ(±s) over ``batch_size`` texts, and each moves at most as far as its score s
    (log σ has slope below 1); a score |s| <= e^logit_scale + |logit_bias| moves at most batching_atol of that.
    """
    scores = model.logit_scale.exp() + model.logit_bias.abs()
    return batch_size * batching_atol(model, scores.detach())


def gradient_atol(model, grad: torch.Tensor, batch_size: int) -> float:
    """batching_atol for a gradient: the longest sum of the backward pass also runs over every token of the batch."""
    tokens = max(model.visual.positional_embedding.shape[0], model.context_length)  # per image, per text
    longest_sum = max(max(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)), batch_size * tokens)
    return longest_sum * EPS32 * grad.abs().max().item()


def count_texts_per_call(loss_fn):
    """The number of texts of each call of ``loss_fn._loss``, as a list that fills as it is called."""
    counts, one_call = [], loss_fn._loss

    def counted(image_features, text_features, *args, **kwargs):
        counts.append(text_features.shape[0])
        return one_call(image_features, text_features, *args, **kwargs)

    loss_fn._loss = counted
    return counts


def run_rank(rank, world_size, init_method, out_path):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group('gloo', init_method=init_method, rank=rank, world_size=world_size)
    model = unbiased_tiny_model()
    # Wrapped as open_clip_train wraps it, device_ids=[device]: DDP takes that on the CPU for Llip (cpu_distributed)
    ddp_model = DistributedDataParallel(model, device_ids=[torch.device('cpu')])
    images, texts = global_batch(world_size)
    local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for impl in IMPLS:
        model.zero_grad()
        loss_fn = loop_loss(model, rank, world_size, impl)
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
def test_processes_give_the_first_step_loss_and_gradients_of_one_process(world_size, tmp_path):
    out_path = tmp_path / 'ranks.pt'
    # Spawned, not forked: a process forked after its parent ran a backward pass cannot run one itself (autograd's
    # worker threads), and earlier tests in the same session do.
    mp.start_processes(run_rank, args=(world_size, f'file://{tmp_path / "rendezvous"}', str(out_path)),
                       nprocs=world_size, start_method='spawn')
    results = torch.load(out_path, weights_only=True)

    model = unbiased_tiny_model()
    loss = loop_loss(model)(**model(*global_batch(world_size)))
    loss.backward()
    for impl in IMPLS:
        ranks = results[impl]
        assert ranks['texts_per_call'] == [world_size * PER_RANK], impl  # one loss call over all texts
        assert abs(sum(ranks['losses']) / world_size - loss.item()) <= loss_atol(model, world_size * PER_RANK), impl
        for name, param in model.named_parameters():
            error = (ranks['grads'][name] - param.grad).abs().max().item()
            assert error <= gradient_atol(model, param.grad, world_size * PER_RANK), f'{impl}: {name}: max error {error:.3g}'


def test_other_models_on_the_cpu_meet_ddp_as_they_did(tmp_path):
    """The adapter gives DDP no device_ids for a Llip model only; stock DDP refuses them for any other CPU module."""
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "rendezvous"}', rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match='device_ids'):
            DistributedDataParallel(torch.nn.Linear(2, 2), device_ids=[torch.device('cpu')])
        assert isinstance(DistributedDataParallel(tiny_model(), device_ids=[torch.device('cpu')]).module, LlipModel)
    finally:
        dist.destroy_process_group()
    assert DistributedDataParallel.__init__.__module__ == cpu_distributed.__name__


LOGGED_LOSS = re.compile(r'Train Epoch: .*? Contrastive_loss: ([0-9.]+)')  # each step's line


def logged_precision(value: float) -> float:
    """Half a unit in the last place of open_clip_train's log, which prints losses with five significant digits."""
    return 0.5 * 10 ** (math.floor(math.log10(abs(value))) - 4)


def test_torchrun_trains_llip_on_the_cpu_with_gloo(tmp_path):
    """The stock module under torchrun (run as __main__), two processes: its first step has the whole batch's loss.

    OpenCLIP's synthetic data repeats one image and one caption, so every image's loss term is the same on each
    rank: rank 0 logs the loss of one process over all W·b samples, provided it scored its images against the
    other rank's texts (alone it would see b − 1 negatives, not W·b − 1). The config is Llip-Tiny's with logit
    bias 0, at which a negative pair's term is near log 2 rather than e^−10.
    """
    folder = tmp_path / 'llip-tiny-unbiased'
    folder.mkdir()
    config = dict(open_clip.get_model_config('Llip-Tiny'), init_logit_bias=0.)
    (folder / 'open_clip_config.json').write_text(json.dumps({'model_cfg': config}))
    model_name, per_rank, samples = f'local-dir:{folder}', 4, 24
    torchrun = Path(sys.executable).with_name('torchrun')
    # torchrun takes --logs for its own --logs-specs (pytorch/pytorch#120601): the run logs to ./logs.
    result = subprocess.run(
        [str(torchrun), '--standalone', '--nproc_per_node', '2', '-m', 'open_clip_train.main', '--model', model_name,
         '--dataset-type', 'synthetic', '--train-num-samples', str(samples), '--batch-size', str(per_rank),
         '--epochs', '1', '--lr', '1e-3', '--warmup', '1', '--workers', '0', '--precision', 'fp32', '--seed', '0',
         '--device', 'cpu', '--dist-backend', 'gloo', '--loss-dist-impl', 'bidir', '--ddp-static-graph',
         '--log-every-n-steps', '1', '--name', 'run'],
        cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-5000:]
    run = tmp_path / 'logs' / 'run'
    log = (run / 'out.log').read_text()
    assert 'Running in distributed mode with multiple processes. Device: cpu' in log and 'total 2.' in log
    losses = [float(value) for value in LOGGED_LOSS.findall(log)]
    assert len(losses) == samples // (2 * per_rank) and all(math.isfinite(loss) for loss in losses)

    torch.manual_seed(0)  # as open_clip_train.main's random_seed(0) before it builds the model
    model, preprocess, _ = open_clip.create_model_and_transforms(model_name, output_dict=True)
    sample = SyntheticDataset(preprocess, image_size=(32, 32), tokenizer=open_clip.get_tokenizer(model_name))[0]
    image, text = (sample['image'], sample['text']) if isinstance(sample, dict) else sample  # OpenCLIP 4: a dict
    batch = 2 * per_rank
    with torch.no_grad():
        whole_batch = loop_loss(model)(**model(image.expand(batch, -1, -1, -1), text.expand(batch, -1))).item()
    assert abs(losses[0] - whole_batch) <= logged_precision(whole_batch) + loss_atol(model, batch)

    trained = torch.load(run / 'checkpoints' / 'epoch_1.pt', weights_only=True)['state_dict']
    model.load_state_dict({name.removeprefix('module.'): value for name, value in trained.items()})
