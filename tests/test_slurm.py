"""The SLURM scripts: bash runs them against stub srun/scontrol, OpenCLIP's parser reads their arguments, which
must be the authors' recipe, and srun's tasks must be the processes torchrun would start."""
import argparse
import os
import re
import stat
import subprocess
from pathlib import Path
from unittest import mock

import open_clip
import pytest
import torch
from open_clip_train import distributed
from open_clip_train.params import parse_args

from open_clip_llip import LlipModel

SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts' / 'slurm'
GPUS_PER_NODE = 8
# The authors' runs (facebookresearch/Llip): llip/run_configs/llip.py (llip_b32, llip_b16_k32, llip_l14_k32,
# llip_h14_k64, llip_G14_k64: nodes × 8 GPUs, batch per GPU, lr, torchcompile, grad_checkpointing, context_length)
# over the defaults of llip/configs.py and llip/training/params.py (lr 5e-4, eps 1e-6 for ViTs), and the text
# context of the model configs they name (llip/open_clip/model_configs/*-ncls:*.json: 64 for L/14 K=32 only).
AUTHORS = {
    'Llip-ViT-B-32': dict(nodes=16, batch_size=256, lr=5e-4, torchcompile=True, grad_checkpointing=False, context=77),
    'Llip-ViT-B-16': dict(nodes=16, batch_size=256, lr=5e-4, torchcompile=True, grad_checkpointing=False, context=77),
    'Llip-ViT-L-14': dict(nodes=16, batch_size=256, lr=4e-4, torchcompile=True, grad_checkpointing=False, context=64),
    'Llip-ViT-H-14': dict(nodes=32, batch_size=128, lr=4e-4, torchcompile=False, grad_checkpointing=True, context=77),
    'Llip-ViT-G-14': dict(nodes=32, batch_size=128, lr=4e-4, torchcompile=False, grad_checkpointing=True, context=77),
}
# What every run of theirs shares (llip_b32 and the Config defaults). Their precision 'amp' autocasts to bf16 on
# A100s (llip/training/train.py, get_autocast); static_graph=True is their DDP (llip/main.py). seed, workers and
# save_frequency as theirs too.
SHARED = dict(epochs=32, train_num_samples=400_000_000, warmup=2000, beta1=0.9, beta2=0.95, eps=1e-6, wd=0.2,
              dataset_resampled=False, precision='amp_bf16', ddp_static_graph=True, seed=0, workers=8, save_frequency=1,
              aug_cfg={'scale': (0.9, 1.0)})  # their RandomResizedCrop (llip/open_clip/transform.py)


def stub(folder: Path, name: str, body: str):
    path = folder / name
    path.write_text(f'#!/bin/sh\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def srun_call(script: Path, tmp_path: Path):
    """What srun would run, and the environment it gets: bash executes the script with srun and scontrol stubbed."""
    stub(tmp_path, 'srun', f'for arg in "$@"; do printf "%s\\0" "$arg"; done > {tmp_path}/argv; env -0 > {tmp_path}/env')
    stub(tmp_path, 'scontrol', 'printf "node001\\nnode002\\n"')
    env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}', DATA_PATH='/data/shards/{00000..00009}.tar',
               SLURM_JOB_NODELIST='node[001-016]')
    subprocess.run(['bash', str(script)], env=env, check=True, capture_output=True)
    argv = (tmp_path / 'argv').read_text().split('\0')[:-1]
    environ = dict(line.split('=', 1) for line in (tmp_path / 'env').read_text().split('\0') if '=' in line)
    return argv, environ


def parser_options() -> set:
    """Every option string of open_clip_train's parser, by its full name."""
    parsers, stock_parse = [], argparse.ArgumentParser.parse_args

    def parse(parser, *args, **kwargs):
        parsers.append(parser)
        return stock_parse(parser, *args, **kwargs)

    with mock.patch.object(argparse.ArgumentParser, 'parse_args', parse):
        parse_args([])
    return set(parsers[0]._option_string_actions)


@pytest.fixture(scope='module')
def options():
    return parser_options()


@pytest.mark.parametrize('name', AUTHORS)
def test_slurm_script_passes_the_authors_recipe_to_open_clip_train(name, options, tmp_path):
    script = SCRIPTS / f'{name}.sbatch'
    authors = AUTHORS[name]
    sbatch = dict(re.findall(r'^#SBATCH --([\w-]+)=(\S+)', script.read_text(), flags=re.M))
    assert (int(sbatch['nodes']), sbatch['gres'], int(sbatch['ntasks-per-node'])) == (
        authors['nodes'], f'gpu:{GPUS_PER_NODE}', GPUS_PER_NODE)  # one task per GPU, as their submitit launcher
    assert int(sbatch['cpus-per-task']) == 10  # submitit_openclip.py

    command, _ = srun_call(script, tmp_path)
    assert command[:3] == ['--cpu_bind=v', '--accel-bind=gn', 'open_clip_train']
    flags = [arg.split('=', 1)[0] for arg in command[3:] if arg.startswith('--')]
    # by their full names: argparse would also take an abbreviation
    assert set(flags) <= options, f'not options of open_clip_train: {set(flags) - options}'
    args = parse_args(command[3:])
    assert args.model == name and args.train_data == '/data/shards/{00000..00009}.tar'
    assert args.dataset_type == 'webdataset' and args.loss_dist_impl == 'bidir'
    for key in ('batch_size', 'lr', 'torchcompile', 'grad_checkpointing'):
        assert getattr(args, key) == authors[key], key
    for key, value in SHARED.items():
        assert getattr(args, key) == value, key
    assert authors['nodes'] * GPUS_PER_NODE * args.batch_size == 32768

    with torch.device('meta'):
        model = open_clip.create_model(args.model, precision=args.precision, device='meta')
    assert isinstance(model, LlipModel)
    assert model.context_length == authors['context']
    assert open_clip.get_tokenizer(args.model).context_length == authors['context']  # what the loop tokenizes to


def world_info(monkeypatch, **environ):
    """(local rank, rank, world size) as OpenCLIP reads them from ``environ``, and whether it runs distributed."""
    for variable in ('LOCAL_RANK', 'RANK', 'WORLD_SIZE', 'SLURM_PROCID', 'SLURM_LOCALID', 'SLURM_NTASKS', 'PMI_RANK',
                     'PMI_SIZE', 'MPI_LOCALRANKID', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE',
                     'OMPI_COMM_WORLD_LOCAL_RANK'):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environ.items():
        monkeypatch.setenv(variable, str(value))
    return distributed.world_info_from_env(), distributed.is_using_distributed()


@pytest.mark.parametrize('name', AUTHORS)
def test_srun_starts_the_processes_torchrun_would(name, tmp_path, monkeypatch):
    """Each srun task, read as OpenCLIP reads SLURM's variables, is the process torchrun --nnodes N
    --nproc_per_node 8 would start there; the script exports the rendezvous address env:// needs."""
    script = SCRIPTS / f'{name}.sbatch'
    sbatch = dict(re.findall(r'^#SBATCH --([\w-]+)=(\S+)', script.read_text(), flags=re.M))
    nodes, per_node = int(sbatch['nodes']), int(sbatch['ntasks-per-node'])
    command, environ = srun_call(script, tmp_path)
    assert environ['MASTER_ADDR'] == 'node001' and environ['MASTER_PORT'].isdigit()  # the first node of the job
    assert parse_args(command[3:]).dist_url is None  # OpenCLIP then rendezvouses at env://, those two variables
    world_size = nodes * per_node
    for node, local in ((0, 0), (0, per_node - 1), (nodes // 2, 3), (nodes - 1, per_node - 1)):
        rank = node * per_node + local
        srun_task = world_info(monkeypatch, SLURM_PROCID=rank, SLURM_LOCALID=local, SLURM_NTASKS=world_size)
        torchrun_process = world_info(monkeypatch, RANK=rank, LOCAL_RANK=local, WORLD_SIZE=world_size)
        assert srun_task == torchrun_process == ((local, rank, world_size), True)
