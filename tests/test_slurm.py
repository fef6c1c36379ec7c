"""The SLURM scripts: bash runs them against stub srun/scontrol, OpenCLIP's parser reads their arguments."""
import os
import re
import stat
import subprocess
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip_train.params import parse_args

from open_clip_llip import LlipModel

SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts' / 'slurm'
# docs/method.md, configurations: nodes (8 GPUs each), per-GPU batch, lr, and how memory/speed are bought.
RECIPE = {
    'Llip-ViT-B-32': (16, 256, 5e-4, 'torchcompile'),
    'Llip-ViT-B-16': (16, 256, 5e-4, 'torchcompile'),
    'Llip-ViT-L-14': (16, 256, 4e-4, 'torchcompile'),
    'Llip-ViT-H-14': (32, 128, 4e-4, 'grad_checkpointing'),
    'Llip-ViT-G-14': (32, 128, 4e-4, 'grad_checkpointing'),
}


def stub(folder: Path, name: str, body: str):
    path = folder / name
    path.write_text(f'#!/bin/sh\n{body}\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def srun_command(script: Path, tmp_path: Path):
    """What srun would run: bash executes the script with srun and scontrol stubbed out."""
    stub(tmp_path, 'srun', f'for arg in "$@"; do printf "%s\\0" "$arg"; done > {tmp_path}/argv')
    stub(tmp_path, 'scontrol', 'echo node001')
    env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}', DATA_PATH='/data/shards/{00000..00009}.tar',
               SLURM_JOB_NODELIST='node[001-016]')
    subprocess.run(['bash', str(script)], env=env, check=True, capture_output=True)
    return (tmp_path / 'argv').read_text().split('\0')[:-1]


@pytest.mark.parametrize('name', RECIPE)
def test_slurm_script_follows_the_paper_and_parses(name, tmp_path):
    script = SCRIPTS / f'{name}.sbatch'
    nodes, batch, lr, speed = RECIPE[name]
    sbatch = dict(re.findall(r'^#SBATCH --([\w-]+)=(\S+)', script.read_text(), flags=re.M))
    assert (int(sbatch['nodes']), sbatch['gres'], int(sbatch['ntasks-per-node'])) == (nodes, 'gpu:8', 8)

    command = srun_command(script, tmp_path)
    assert command[:3] == ['--cpu_bind=v', '--accel-bind=gn', 'open_clip_train']
    args = parse_args(command[3:])
    assert args.model == name and args.train_data == '/data/shards/{00000..00009}.tar'
    assert nodes * 8 * args.batch_size == 32768 and args.batch_size == batch and args.lr == lr
    assert (args.epochs, args.train_num_samples, args.warmup) == (32, 400_000_000, 2000)
    assert (args.beta1, args.beta2, args.eps, args.wd) == (0.9, 0.95, 1e-6, 0.2)
    assert args.aug_cfg == {'scale': (0.9, 1.0)} and args.precision == 'amp_bf16'
    assert args.loss_dist_impl == 'bidir' and args.dataset_resampled
    assert getattr(args, speed) and not getattr(args, {'torchcompile': 'grad_checkpointing'}.get(speed, 'torchcompile'))

    with torch.device('meta'):
        model = open_clip.create_model(args.model, precision=args.precision, device='meta')
    assert isinstance(model, LlipModel)
    assert model.context_length == open_clip.get_model_config(name)['text_cfg']['context_length']
