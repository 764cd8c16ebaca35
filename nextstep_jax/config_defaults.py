"""Every config field at its default, documented once: `get_base_config()`.

Experiment files (`configs/*.py`, loaded by path by `nextstep_jax.configlib.load_config`) define
`get_config(arg=None)` returning a ConfigDict built from these defaults; `arg` selects a named
variant (e.g. `configs/shapes.py:small`). Command-line overrides use `--config.train.steps=100`.
`nextstep_jax.configlib.validate` checks a config before any device work and names the field and
the fix on failure. Stored run configs are completed with these defaults
(`configlib.with_base_defaults`), and the converter starts from them.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'base'  # Experiment name, used in logs and workdir names.
  c.seed = 0  # One seed for init, data order, FM noise and training samples.
  c.workdir = ''  # Where checkpoints, TensorBoard events, samples go ('' = runs/<name>).

  # Backbone + heads. Names follow the official config.json (Qwen2 fields + NextStep fields).
  c.model = ml_collections.ConfigDict()
  m = c.model
  m.vocab_size = 512  # Embedding rows; must be >= the text tokenizer's vocabulary.
  m.hidden_size = 256  # Decoder width D.
  m.num_layers = 4  # Decoder layers (scanned; stacked on a leading `layers` axis).
  m.num_heads = 4  # Query heads H.
  m.num_kv_heads = 2  # KV heads K (GQA); num_heads % num_kv_heads == 0.
  m.head_dim = 64  # Per-head width.
  m.intermediate_size = 704  # SwiGLU hidden width.
  m.rms_norm_eps = 1e-5
  m.rope_theta = 10000.0  # RoPE base (official: 1e6).
  m.attention_bias = True  # q/k/v projection biases (official: true).
  m.o_attention_bias = False  # o_proj bias (official: false).
  m.tie_word_embeddings = False  # lm_head shares embed_tokens (official: false).
  m.latent_channels = 3  # Channels of the image tokenizer's latent (VAE: 16; pixels: 3).
  m.latent_patch_size = 4  # Latent patch side; token dim = latent_channels * patch**2.
  m.fm_head_dim = 256  # Flow head width (official 1536).
  m.fm_head_layers = 3  # Flow head AdaLN residual blocks (official 12).
  m.fm_head_step_cond = False  # Few-step head: zero-initialised step-size embedding (not official).
  m.use_gen_pos_embed = False  # Add a 2-D sincos table to the head condition (official: off).
  m.base_image_grid_size = 8  # Side G of the gen_pos_embed table (G*G positions).
  m.max_seq_len = 128  # Longest sequence (prompt + image tokens) the model is used with.
  m.dtype = 'float32'  # Compute dtype (bfloat16 on TPU).
  m.param_dtype = 'float32'  # Master parameter dtype.
  m.remat_policy = 'none'  # none | full | dots_saveable | dots_with_no_batch_dims_saveable.
  # Scale (issue 4): attention kernel of full-sequence passes (training, prefill): xla | splash
  # (Pallas TPU kernel; interpret mode off TPU). Decode steps always use XLA.
  m.attention = 'xla'
  m.scan_unroll = False  # Unroll layer and integration-step scans: exact compiler cost analysis (AOT calibration only).
  # Weight-only quantization for sampling (nextstep_jax/model/quant.py, qwix): linear-layer kernels
  # stored as int8/int4 with scales in model.dtype; activations stay in model.dtype. Training only
  # with LoRA (QLoRA: the quantized base is frozen, the adapters train).
  m.quant = ml_collections.ConfigDict()
  m.quant.mode = (
    'none'  # none | int8 (per output channel) | int4 (per group of the contracted axis).
  )
  m.quant.group_size = (
    128  # int4 group along the contracted axis (axes it does not divide: per channel).
  )
  m.quant.head = True  # Also quantize the flow head's linear layers (else they keep param_dtype).
  m.quant.embedding = False  # Also quantize embed_tokens (per row) and lm_head (the vocab tables).

  # Image tokenizer: images (B, S, S, 3) in [-1, 1] <-> latents (B, S/f, S/f, latent_channels).
  c.image = ml_collections.ConfigDict()
  c.image.tokenizer = 'pixels'  # pixels (normalised pixels, f=1) | vae (image-tokenizer issue).
  c.image.size = 32  # Image side S in pixels (square).
  c.image.use_norm = False  # Per-token LayerNorm of sampled tokens (official `use_norm`; VAE with encoder_norm only).

  # VAE tokenizer (image.tokenizer='vae'): Flux-layout KL autoencoder, f = 2**(len(ch_mult)-1).
  # Defaults are the official f8ch16 (NextStep-1-f8ch16-Tokenizer); a checkpoint's own config wins.
  c.image.vae = ml_collections.ConfigDict()
  v = c.image.vae
  v.checkpoint = (
    ''  # nextstep-train-tokenizer workdir or official release dir ('' = random init, tests only).
  )
  v.in_channels = 3
  v.out_ch = 3
  v.ch = 128  # Base width; level i has ch * ch_mult[i] channels.
  v.ch_mult = (1, 2, 4, 4)
  v.num_res_blocks = 2  # ResnetBlocks per encoder level (decoder: + 1).
  v.z_channels = 16  # Latent channels; must equal model.latent_channels.
  v.norm_groups = 32  # GroupNorm groups (official 32).
  v.scaling_factor = 1.0  # latents = (z - shift_factor) * scaling_factor (official 1.0 / 0.0).
  v.shift_factor = 0.0
  v.deterministic = True  # Encode to the posterior mean.
  v.encoder_norm = True  # LayerNorm each psz x psz patch of the mean (official true).
  v.psz = 2  # Patch side of encoder_norm (unverified official value; see docs/model.md §2).
  v.batch_chunk = 8  # Images per device per encode/decode pass (bounds memory, e.g. 1024px).
  # Spatial tiling (image/vae_tiling.py): encode/decode overlapping tiles of tile_size latent
  # pixels blended with linear ramps when a latent side exceeds tile_size (official: 1024px images
  # in 3x3 tiles of 512px; 512px and below untiled, exact). GroupNorm and attention become per tile.
  v.tile_size = 64  # Tile side in latent pixels (0 = never tile).
  v.tile_overlap = 16  # Minimum overlap of neighbouring tiles in latent pixels (< tile_size).
  v.dtype = 'float32'
  v.param_dtype = 'float32'

  # Tokenizer training (nextstep-train-tokenizer): reconstruction L1 + L2, KL, latent noise, GAN.
  c.vae_train = ml_collections.ConfigDict()
  t = c.vae_train
  t.steps = 2000
  t.batch_size = 32
  t.lr = 2e-4
  t.warmup_steps = 100
  t.l1_weight = 1.0
  t.l2_weight = 1.0
  t.kl_weight = 1e-6  # On the KL summed over latent elements, averaged over images.
  t.noise_max = (
    0.0  # Latent noise gamma: decode(latents + alpha * eps), alpha ~ U[0, gamma] (paper 0.2).
  )
  t.disc_weight = 0.0  # Hinge-GAN generator weight (0 = no discriminator).
  t.disc_start = 1000  # Step from which the discriminator trains and the GAN loss applies.
  t.disc_ch = 32  # Patch discriminator base width.
  t.num_eval = 256  # Held-out images for PSNR/SSIM, channel statistics and grids.
  t.log_every = 50
  t.checkpoint_every = 500
  t.grid_every = 500  # Reconstruction grid PNG period (0 = only at the end).
  t.keep_checkpoints = 2

  # Text tokenizer (sentencepiece trained deterministically from the dataset's captions).
  c.text = ml_collections.ConfigDict()
  c.text.vocab_size = 384  # Sentencepiece pieces requested (specials + 256 byte pieces included).
  c.text.max_caption_tokens = 24  # Longest caption in tokens; longer prompts are an error.
  c.text.spm_path = ''  # Explicit model path; '' = train/load <data cache>/<dataset>_spm.model.
  # Words added to the sentencepiece model as one piece each ('\u2581word', ids after its vocabulary),
  # e.g. ('orange', 'diamond') to fine-tune a shapes run on new concepts (see train.init_word_rows).
  c.text.extra_words = ()
  # spm (the sentencepiece stand-in above) | hf (the official Qwen2.5 tokenizer.json with the
  # NextStep special tokens; text.vocab_size is then unused and model.vocab_size must cover its ids).
  c.text.tokenizer = 'spm'
  c.text.tokenizer_json = (
    ''  # hf: tokenizer.json path ('' = the one in train.init_from's directory).
  )

  # Built-in data.
  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'shapes'  # shapes | digits | shapes_new (fine-tuning set with new concepts).
  c.data.new_concept_fraction = (
    0.5  # shapes_new: share of one-object new-concept scenes (rest: base replay).
  )
  c.data.num_train = 20000  # Training examples generated (shapes) / drawn with augmentation.
  c.data.drop_text_prob = 0.1  # Caption moved after the image block (trains the uncond branch).
  c.data.cache_dir = ''  # Where generated data and the spm model live ('' = ~/.cache/nextstep_jax).
  # Grain input pipeline (nextstep_jax/data/grain_pipeline.py; shards from `nextstep-data build`).
  c.data.source = (
    'builtin'  # builtin (data.dataset in memory) | arrayrecord (data.paths) | tfds | edit.
  )
  c.data.grain_builtin = False  # Serve data.source=builtin through the Grain pipeline too.
  c.data.paths = ''  # arrayrecord: comma-separated shard files or globs (name-*.array_record).
  c.data.tfds_name = ''  # tfds: a prepared array_record data set (nothing is downloaded).
  c.data.tfds_split = 'train'
  c.data.tfds_data_dir = ''  # tfds: its data_dir ('' = TFDS default ~/tensorflow_datasets).
  c.data.tfds_image_key = 'image'  # tfds feature holding the image (decoded array or file bytes).
  c.data.tfds_caption_key = 'caption'  # tfds feature holding the caption (str or bytes).
  c.data.shuffle_seed = -1  # Global shuffle + augmentation seed (-1 = seed).
  c.data.worker_count = 0  # Grain worker processes decoding ahead (0 = threads in the trainer).
  c.data.read_threads = 2  # Threads per process reading and preprocessing records.
  c.data.prefetch = 2  # Batches buffered per worker (and records x batch_size read ahead).
  c.data.overlong_captions = 'truncate'  # truncate (warned and counted) | skip (counted).
  c.data.augment = ''  # Comma list of hflip, random_crop ('' = resize + centre crop only).
  c.data.random_crop_scale = 1.125  # random_crop: resize to cover this x image.size, crop randomly.
  c.data.use_latent_cache = False  # Train from data.latent_cache_paths instead of raw images.
  c.data.latent_cache_paths = ''  # Shards of `nextstep-data cache-latents` (comma list / globs).
  c.data.cache_variants = 1  # Latent variants per record (1 = plain; >1 needs data.augment).
  # Aspect-ratio buckets (nextstep_jax/data/aspect_buckets.py): token grids 'h*w' as the official
  # area string (e.g. ('16*16', '12*21', '21*12') at 256 px); each record goes to the nearest
  # aspect, every global batch is one bucket (one compiled step shape each). () = square image.size.
  c.data.aspect_buckets = ()
  # Edit triplets (data.source='edit': data.paths from `nextstep-data build --from edit-folder`;
  # data/edit_data.py). Shares of rows trained as the unconditional branches of 3-way guidance:
  # empty instruction with the source image, instruction without it, neither (the rest full).
  c.data.edit_drop_text_prob = 0.1
  c.data.edit_drop_image_prob = 0.05
  c.data.edit_drop_both_prob = 0.05

  # Objective.
  c.loss = ml_collections.ConfigDict()
  c.loss.lm_loss_weight = 0.01
  c.loss.im_loss_weight = 1.0
  c.loss.fm_head_batch_mul = 4  # Head copies per image token, fresh noise and time each.
  c.loss.time_mean = 0.0  # Logit-normal time: t = sigmoid(n), n ~ N(mean, std).
  c.loss.time_std = 1.0
  # Few-step head objective (model.fm_head_step_cond must be on for 'shortcut').
  c.loss.head_objective = 'flow'  # flow (official) | shortcut (jointly trained self-consistency).
  c.loss.shortcut_fraction = 0.25  # Share of head rows trained on the self-consistency target.
  c.loss.shortcut_max_steps = 64  # Finest shortcut step 1/64; levels d = 2^-l, l = 0..6.

  # Sampler (defaults of the official NextStep-1 T2I example except N and cfg).
  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 50  # Head integration steps N per image token.
  c.sample.solver = 'sde'  # sde (official Euler-Maruyama) | euler | heun (deterministic ODE).
  c.sample.time_grid = 'A'  # A: linspace(0, 1-last_step_size) + final step; B: ends at t=1.
  c.sample.timestep_shift = 1.0  # t' = t / (s - (s-1) t).
  c.sample.last_step_size = 0.04  # Grid A's final deterministic step.
  c.sample.cfg = 3.0  # Text guidance scale.
  c.sample.cfg_schedule = 'constant'  # constant | linear (decays to 1 over the image tokens).
  c.sample.temperature = 1.0  # Scale of the initial noise x0 and of the SDE noise.
  c.sample.seed = 42
  c.sample.positive_prompt = ''  # Appended to each caption after a space when non-empty.
  c.sample.negative_prompt = ''  # Caption of the unconditional row.
  c.sample.batch_size = 16  # Prompts per jitted generation call.
  c.sample.times = ()  # Explicit step schedule 0 < ... < 1 (overrides num_steps and time_grid).
  c.sample.token_steps = ()  # Annealed steps per equal token segment, e.g. (8, 4, 2, 1); () = num_steps.

  # Training.
  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 64  # Global batch of sequences.
  # Scale (issue 4): gradient accumulation. The global batch runs as this many microbatches (a
  # lax.scan, f32 gradients, one update): same loss and update, activations of 1/K of it at a
  # time. Must divide the rows of each batch-sharding device (batch_size / (data x fsdp)).
  c.train.microbatches = 1
  c.train.lr = 1e-3  # Peak learning rate.
  c.train.lr_schedule = 'cosine'  # cosine | constant (both after linear warm-up).
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.1  # Cosine floor as a fraction of lr.
  c.train.weight_decay = 0.1  # AdamW, not on biases, norms or embeddings of 1-D params.
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0  # Global-norm clipping.
  c.train.log_every = 50  # Scalar logging (TensorBoard + console) period in steps.
  c.train.checkpoint_every = 500  # Orbax checkpoint period in steps (and at the end).
  c.train.keep_checkpoints = 3  # Checkpoints kept.
  c.train.sample_every = 1000  # Sample-grid PNG period in steps (0 = only at the end).
  c.train.num_grid_samples = 16  # Images in a sample grid.
  # Prompts of the sample grid (cycled to num_grid_samples); () = the built-in data set's fixed
  # prompts, and no grid for other data (data.source arrayrecord / tfds / edit) unless given.
  c.train.grid_prompts = ()
  c.train.max_minutes = 0.0  # Stop (with a checkpoint) after this wall time; 0 = no limit.
  # Fine-tuning (training/init_from.py): start from the params of a converted release
  # (nextstep-convert --out DIR) or of another run (WORKDIR or WORKDIR@STEP), restored onto the
  # training shardings and cast to model.param_dtype, with a fresh optimizer at step 0. A run with
  # checkpoints of its own resumes from them instead. '' = random init.
  c.train.init_from = ''
  # fnmatch patterns over dotted param names kept at their random init (and not required in the
  # source), e.g. ('image_head.*',) for a new flow head or ('lm_head.kernel',).
  c.train.init_from_skip = ()
  # After init_from: 'new=old1+old2' sets the embedding and lm_head rows of the word `new` (e.g. a
  # text.extra_words word) to the mean of the rows of the old words, e.g. 'orange=red+green+blue'.
  c.train.init_word_rows = ()
  # LoRA fine-tuning (nextstep_jax/model/lora.py, qwix adapters on the decoder's linear layers):
  # only the adapters (and the flow head with train_head) are trained and have optimizer state.
  c.train.lora = ml_collections.ConfigDict()
  c.train.lora.rank = 0  # Adapter rank r (0 = LoRA off: every param trains).
  c.train.lora.alpha = 16.0  # Update scale alpha / r.
  # Regexes (full match) over a decoder layer's Dense paths: self_attn/{q,k,v,o}_proj, mlp/{gate,up,down}_proj.
  c.train.lora.targets = ('self_attn/.*', 'mlp/.*')
  c.train.lora.train_head = False  # Also train the flow head (image_head) fully.

  # Device mesh: axis sizes, -1 absorbs the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Logical axis -> mesh axes (ordered; a mesh axis of size 1 drops out).
  c.mesh.rules = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', None),
    ('token', None),
    ('head_embed', None),
    ('head_mlp', 'tensor'),
    ('head_freq', None),
    ('embed_out', None),
    ('norm', None),
    # VAE (image tokenizer): parameters replicated, activations over `batch`.
    ('conv_height', None),
    ('conv_width', None),
    ('conv_in', None),
    ('conv_out', None),
  )
  return c
