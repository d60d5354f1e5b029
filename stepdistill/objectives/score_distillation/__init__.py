"""Score distillation: a generator trained against a frozen real score and a learned fake score (the critic).
critic.py (fake score, GAN head), gradients.py (DMD's normalized DM gradient, the surrogate loss), real_data.py
(real samples for the GAN term), base.py (phases, critic loss, GAN terms), and the methods: dmd2.py."""
