"""Evaluation throughput of a Llip model on this machine (random weights, synthetic images).

Reports, for zero-shot classification against C classes (default: ImageNet's 1,000 names with
OpenAI's 80 templates):

- ``classifier_build_s``: seconds to build the zero-shot classifier (C × templates texts);
- ``zero_shot_images_per_s``: images classified per second — image encoding, conditioned
  scores against the C classes and top-1/top-5, classifier build excluded;
- ``encode_images_per_s``: the image encoding alone;
- ``scoring_pairs_per_s``: (image, class) pairs per second of the conditioned scoring alone
  (``conditioned_cosine`` on encoded images).

    python scripts/bench_eval.py --model Llip-Tiny --classes 1000 --json bench.json
"""
import argparse
import logging
import os
import time

import open_clip
import torch
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from open_clip_llip import (
    build_zero_shot_classifier,
    conditioned_cosine,
    topk_correct,
    unpack_image,
    unpack_text,
    zero_shot_cosine,
)
from open_clip_llip.written_files import add_json_output, check_json_output, write_json


def timed(function, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``function``, after one warm-up call.

    The fastest call is the best estimate of the machine's speed when other processes share it
    (as ``timeit`` recommends); the figures are throughputs at that speed.
    """
    function()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='Llip-Tiny')
    parser.add_argument('--classes', type=int, default=1000, help='At most 1,000 (ImageNet class names).')
    parser.add_argument('--templates', type=int, default=len(OPENAI_IMAGENET_TEMPLATES), help='At most 80.')
    parser.add_argument('--batch-size', type=int, default=256, help='Images per batch.')
    parser.add_argument('--repeats', type=int, default=10, help='Timed batches (the fastest counts), after one warm-up.')
    parser.add_argument('--device', default='cpu')
    add_json_output(parser)
    args = parser.parse_args(argv)
    if not 1 <= args.classes <= len(IMAGENET_CLASSNAMES) or not 1 <= args.templates <= len(OPENAI_IMAGENET_TEMPLATES):
        parser.error(f'--classes must be in [1, {len(IMAGENET_CLASSNAMES)}] and --templates in '
                     f'[1, {len(OPENAI_IMAGENET_TEMPLATES)}]')
    check_json_output(parser, args)
    logging.basicConfig(level=logging.WARNING)

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, device=args.device).eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    images = torch.randn(args.batch_size, 3, *model.visual.image_size, device=args.device)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=args.device)
    classnames, templates = IMAGENET_CLASSNAMES[:args.classes], OPENAI_IMAGENET_TEMPLATES[:args.templates]

    with torch.inference_mode():
        start = time.perf_counter()
        classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates, device=args.device)
        build_s = time.perf_counter() - start

        def classify():
            topk_correct(zero_shot_cosine(model, classifier, images)[0], labels, (1, 5)).tolist()

        keys, values = unpack_image(model.encode_image(images))
        gram = model.mixer.image_gram(values)
        class_queries, class_targets = unpack_text(classifier)

        def score():
            conditioned_cosine(keys, values, gram, class_queries, class_targets, model.mixer.temperature)[0, 0].item()

        classify_s = timed(classify, args.repeats)
        encode_s = timed(lambda: model.encode_image(images)[0, 0, 0, 0, 0].item(), args.repeats)
        score_s = timed(score, args.repeats)

    figures = dict(
        model=args.model, device=args.device, threads=torch.get_num_threads(), torch=torch.__version__,
        load_average=os.getloadavg()[0],  # other processes on the machine slow every figure down
        classes=args.classes, templates=args.templates, batch_size=args.batch_size,
        classifier_build_s=build_s,
        zero_shot_images_per_s=args.batch_size / classify_s,
        encode_images_per_s=args.batch_size / encode_s,
        scoring_pairs_per_s=args.batch_size * args.classes / score_s,
    )
    print(f"{args.model} on {args.device} ({figures['threads']} threads), {args.classes} classes × "
          f"{args.templates} templates, batches of {args.batch_size} images (load average {figures['load_average']:.2f}):")
    print(f"  classifier build         {build_s:10.2f} s")
    print(f"  zero-shot classification {figures['zero_shot_images_per_s']:10.1f} images/s")
    print(f"  image encoding alone     {figures['encode_images_per_s']:10.1f} images/s")
    print(f"  conditioned scoring      {figures['scoring_pairs_per_s']:10.3g} pairs/s")
    if args.json:
        write_json(args.json, figures, args.overwrite)
    return figures


if __name__ == '__main__':
    main()
