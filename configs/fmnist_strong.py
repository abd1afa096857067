"""
FashionMNIST with a stronger recipe for the same 2-layer ViT as configs/fmnist.py: random crops (the 32x32 image
zero-padded by 2 pixels) and left-right flips, drawn on the device, plus label smoothing 0.1; 30 epochs.
    python train.py configs/fmnist_strong.py --attn=toeplitz   # softmax | linear | toeplitz | topo | grf
Tiny ViTs reach 91-93% on FashionMNIST with such augmentation and longer schedules; the plain recipe gives ~87%.
This asks whether the masks still matter under a better recipe. The model is unchanged, so that the two recipes
compare the same five attentions; only the data the model sees and the targets differ.
"""
exec(open('configs/fmnist.py').read())  # the plain recipe as it is (paths from the repository's root), then:
# what differs from configs/fmnist.py
crop_pad = 2               # random crops: the image shifted by up to 2 pixels each way, zeros filling in
flip = True                # half the training images mirrored left-right (clothes are near-symmetric)
label_smoothing = 0.1
