"""
Taking over a trained softmax model, at CPU scale: a softmax Imagenette model (configs/imagenette.py, 16 epochs)
converted into linear, toeplitz, topo or grf and fine-tuned for 4 epochs. Every shared weight is kept; the mask starts
as configured (K = 100, f_k = exp(-0.01 k), 100 repelling walks: configs/imagenet.py's). The run evaluates the
converted model before its first step (epoch 0 in metrics.jsonl). This asks how well a mask lets linear attention take
over a trained softmax model, not the paper's from-scratch question.

    python sweep.py --config_file=configs/imagenette.py --out_root=results/imagenette-takeover --attns=softmax \\
        --seeds=3 --jobs=2 --threads=1 --args='--data_dir=../shared/data/imagenette --mask_seed={seed}'
    python sweep.py --config_file=configs/imagenette_takeover.py --out_root=results/imagenette-takeover/4-epochs \\
        --attns=linear,toeplitz,topo,grf --seeds=3 --jobs=2 --threads=1 --args='--data_dir=../shared/data/imagenette \\
        --mask_seed={seed} --init_from=results/imagenette-takeover/softmax-s{seed}/ckpt.pt'
    python report.py results/imagenette-takeover --no_plots --vs=source --at_epochs=0,1,2,4
    python report.py results/imagenette-takeover results/imagenette --no_plots --vs=scratch --at_epochs=0,1,2,4

The recipe: configs/imagenette.py's but for the length and the schedule: a short warm-up (a third of an epoch) so that
the fresh mask parameters and the changed token mixing do not wreck the trained weights in the first steps, then cosine
to 1e-5 over the 4 epochs. The peak learning rate is the one setting chosen by a pilot: grf from softmax-s0 at 1e-4,
3e-4 and 1e-3, the highest final top-1 (results/README.md, imagenette-takeover); it equals the from-scratch peak.
"""
import os
exec(open(os.path.join(os.path.dirname(__file__), 'imagenette.py')).read())  # the sources' recipe, then:
out_dir = 'out/imagenette-takeover-{attn}'
epochs = 4
warmup_steps = 9           # a third of an epoch of 27 steps
lr = 1e-3                  # the peak: the pilot's choice (results/README.md)
min_lr = 1e-5
