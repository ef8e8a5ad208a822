#compdef lrtool
# zsh completion for lrtool, generated from lrtool/cli.py by `python -m lrtool.docs` (make docs): do not edit.

_lrtool() {
  local curcontext=$curcontext state state_descr line ret=1
  typeset -A opt_args
  _arguments -C -s -S \
    '(-q --quiet)'{-q,--quiet}'[Print nothing but data and errors.]' \
    '(-v --verbose)'{-v,--verbose}'[Log more detail to stderr.]' \
    '--debug[Show tracebacks (also LRTOOL_DEBUG=1).]' \
    '--version[Print the version and exit.]' \
    '(-h --help)'{-h,--help}'[Show this message and exit.]' \
    '1: :->command' \
    '*:: :->argument' && ret=0
  case $state in
    (command)
      local -a commands=(
        'train:Train a LoRA (or, with --full, every weight) of a causal LM on JSONL prompt/answer datasets.'
        'merge:Merge LoRA adapters into one adapter, or into a base model'\''s weights, exactly as each method defines.'
        'diagnose:Check LoRA adapters before using or merging them: intact, format, fit to a base, spectra, interference.'
        'eval:Score base, adapters, merges and models side by side on JSONL datasets, with intervals.'
        'route:Build a router: pick or mix adapters per input or per token instead of averaging their parameters.'
        'gen-data:Generate synthetic datasets whose test sets need composition.'
      )
      _describe -t commands 'lrtool command' commands && ret=0
      ;;
    (argument)
      curcontext=${curcontext%:*:*}:lrtool-$words[1]:
      case $words[1] in
        (train) _lrtool_train && ret=0 ;;
        (merge) _lrtool_merge && ret=0 ;;
        (diagnose) _lrtool_diagnose && ret=0 ;;
        (eval) _lrtool_eval && ret=0 ;;
        (route) _lrtool_route && ret=0 ;;
        (gen-data) _lrtool_gen_data && ret=0 ;;
      esac
      ;;
  esac
  return ret
}

_lrtool_train() {
  _arguments -s -S \
    '--base=[Base model\: a Hugging Face model directory, a hub id, or tiny / tiny\:PRESET (micro, tiny, small, base) for a new Llama made here.]:TEXT:_files' \
    '(-o --out)'{-o+,--out=}'[Output directory (printed on stdout).]:DIR:_files' \
    '--full[Train every weight (e.g. pretrain the tiny base) instead of a LoRA.]' \
    '(-r --rank)'{-r+,--rank=}'[LoRA rank; 0 with --train-tokens trains only embedding rows.]:INT: ' \
    '--alpha=[LoRA alpha (default\: 2 x rank).]:FLOAT: ' \
    '--rslora[Scale by alpha / sqrt(rank) (rsLoRA).]' \
    '--dropout=[LoRA dropout.]:FLOAT: ' \
    '--targets=[Comma-separated module names to adapt (default\: every linear layer of the blocks).]:TEXT:_files' \
    '--init=[LoRA initialisation (peft'\''s init_lora_weights).]:INIT:(default gaussian)' \
    '--train-tokens=[Also train these tokens'\'' embedding rows\: comma-separated words, a file of words, or new (tokens of DATA that the base never saw in pretraining).]:WORDS|FILE|new:_files' \
    '*--vocab-from=[With --base tiny\: make every word of PATH one token; a directory means its .jsonl files (a gen-data world).]:PATH:_files' \
    '--lr=[Peak learning rate (default\: 1e-3 with --full, 5e-4 LoRA).]:FLOAT: ' \
    '--weight-decay=[AdamW weight decay (default\: 0.1 with --full, 0 LoRA).]:FLOAT: ' \
    '--epochs=[Passes over the data (default 20 unless --max-steps).]:FLOAT: ' \
    '--max-steps=[Optimizer steps (overrides --epochs).]:INT: ' \
    '--batch-size=[Examples per optimizer step, over all processes (default\: 128 with --full, 64 LoRA).]:INT: ' \
    '--grad-accum=[Split each step into this many micro-batches (same result, less memory).]:INT: ' \
    '--warmup=[Linear warm-up steps (default\: a tenth of the run).]:INT: ' \
    '--schedule=[Learning-rate schedule after warm-up.]:SCHEDULE:(cosine constant)' \
    '--loss=[Tokens with loss\: answer (prompt masked; default) or all (plain corpora; default with --full).]:LOSS:(answer all)' \
    '--chat-template[Format prompt and answer with the base tokenizer'\''s chat template (eval takes the same flag).]' \
    '--until-accuracy=[Stop once greedy exact match on a sample of the training examples reaches X; exit 3 if the run ends below it.]:X: ' \
    '--check-every=[Steps between accuracy checks.]:INT: ' \
    '--check-sample=[Training examples per accuracy check.]:INT: ' \
    '--seed=[Seed of initialisation and data order\: same seed, same bytes.]:INT: ' \
    '--device=[Where to train; auto picks CUDA when present.]:auto|cpu|cuda\[\:N\]:_files' \
    '--dtype=[Weights'\'' dtype (default\: the base'\''s).]:DTYPE:(float32 bfloat16 float16)' \
    '--max-length=[Longest line in tokens; longer prompts lose tokens on the left.]:INT: ' \
    '--log-every=[Steps between train_log.jsonl lines.]:INT: ' \
    '--resume[Continue from the checkpoint an interrupted run left in OUT.ckpt/.]' \
    '--trust-remote-code[Allow the base'\''s own Python code (off by default).]' \
    '--force[Replace an existing output (only one lrtool wrote).]' \
    '(-q --quiet)'{-q,--quiet}'[Print nothing but data and errors.]' \
    '(-v --verbose)'{-v,--verbose}'[Log more detail to stderr.]' \
    '(-h --help)'{-h,--help}'[Show this message and exit.]' \
    '*:DATA.jsonl...:_files'
}

_lrtool_merge() {
  _arguments -s -S \
    '(-o --out)'{-o+,--out=}'[Output directory (printed on stdout).]:DIR:_files' \
    '--method=[Merge method (see --list).]:METHOD:(linear svd factor-avg ties dare-linear dare-ties magnitude-prune knots task-arithmetic della della-linear breadcrumbs breadcrumbs-ties sce slerp karcher tsv iso-c iso-cts core-space)' \
    '--weights=[One weight per adapter (default\: 1/N each); negative weights negate.]:W1,W2,...:_files' \
    '(-r --rank)'{-r+,--rank=}'[svd\: the rank kept; dense methods and knots\: the rank the result is stored at (default\: per module, the largest input rank; knots\: exact).]:INT: ' \
    '--density=[ties, dare-*, magnitude-prune, knots\: fraction of entries kept, in (0, 1\] (default 0.5).]:FLOAT: ' \
    '--seed=[dare-*\: seed of the drop masks (default 0).]:INT: ' \
    '--epsilon=[della, della-linear\: keep probabilities run from D - epsilon (a row'\''s smallest entry) to D + epsilon (its largest) (default 0.15).]:FLOAT: ' \
    '--lambda=[della, della-linear\: multiply the merged update by lambda (default 1).]:FLOAT: ' \
    '--gamma=[breadcrumbs, breadcrumbs-ties\: fraction of largest-magnitude entries dropped, in \[0, 1) (default 0.01).]:FLOAT: ' \
    '--t=[slerp\: where between its two adapters, 0 the first and 1 the second (default 0.5).]:FLOAT: ' \
    '--into-base=[Add the exact update to this Hugging Face model directory'\''s weights (or a diffusers pipeline'\''s) and write the whole model instead of an adapter.]:BASE:_files' \
    '--allow-base-mismatch[Merge adapters whose configs name different bases (e.g. one model under two names).]' \
    '--format=[The merged adapter'\''s format (default\: the inputs'\'' own when they share one, else peft)\: peft (adapter_config.json + adapter_model.safetensors), kohya (lora.safetensors), diffusers (pytorch_lora_weights.safetensors) or mlx (mlx-lm'\''s adapters.safetensors + adapter_config.json).]:ADAPTER_FORMAT:(peft kohya diffusers mlx)' \
    '--list[Print the methods as JSON lines (name, summary, parameters) and exit.]' \
    '--force[Replace an existing output (only one lrtool wrote).]' \
    '(-q --quiet)'{-q,--quiet}'[Print nothing but data and errors.]' \
    '(-v --verbose)'{-v,--verbose}'[Log more detail to stderr.]' \
    '(-h --help)'{-h,--help}'[Show this message and exit.]' \
    '*:ADAPTER:_files'
}

_lrtool_diagnose() {
  _arguments -s -S \
    '--base=[A local Hugging Face model directory, or a diffusers pipeline'\''s (or one component'\''s)\: report modules it lacks or shapes it disagrees with, and relative_norm = ||dW|| / ||W||.]:DIR:_files' \
    '--fail-on=[Exit 3, after writing the report, when a finding is at or above this severity.]:SEVERITY:(error warning)' \
    '--table[Also print a summary table to stderr.]' \
    '--exact-sign-conflicts[Count sign conflicts over every entry of large pairs too (a 7B-sized pair\: several times longer) instead of estimating them from 2^20 sampled entries.]' \
    '--plot=[Draw the spectra and the pairwise cosine matrix (needs matplotlib).]:FILE.png:_files' \
    '--force[Replace an existing output (only one lrtool wrote).]' \
    '(-q --quiet)'{-q,--quiet}'[Print nothing but data and errors.]' \
    '(-v --verbose)'{-v,--verbose}'[Log more detail to stderr.]' \
    '(-h --help)'{-h,--help}'[Show this message and exit.]' \
    '*:ADAPTER...:_files'
}

_lrtool_eval() {
  _arguments -s -S \
    '--base=[The base model\: a Hugging Face model directory or hub id (required unless --combine).]:BASE:_files' \
    '*--system=[A system to score; SPEC is base, adapter\:PATH, model\:DIR, peft\:DIR or router\:DIR.]:NAME=SPEC:_files' \
    '*--adapter=[Shorthand for --system NAME=adapter\:PATH.]:PATH:_files' \
    '*--model=[Shorthand for --system NAME=model\:DIR.]:DIR:_files' \
    '--score=[What to score\: exact match, log-likelihoods, or both (see the description).]:exact|loglik|exact,loglik:_files' \
    '--choices=[Candidate answers for choice_accuracy, one a line (default\: each dataset'\''s distinct answers of the same meta.task).]:FILE:_files' \
    '--max-choices=[At most this many candidates per example (answer included).]:INT: ' \
    '*--by=[Break results down by meta keys; commas cross keys, repeat for several breakdowns (default\: each meta key with 2 to 20 distinct values).]:KEY\[,KEY\]:_files' \
    '--bootstrap=[Bootstrap resamples of each interval (0\: no intervals).]:INT: ' \
    '--reference=[Add each other system'\''s paired difference to this one, with its interval.]:NAME:_files' \
    '--limit=[Score the first N examples of each dataset.]:N: ' \
    '--batch-size=[(system, example) rows per forward pass, rounded down to whole examples (every system that shares the base scores an example in the same batch).]:INT: ' \
    '--max-new-tokens=[Longest generation (default\: the longest answer plus 16 tokens).]:INT: ' \
    '--chat-template[Format prompts with the tokenizer'\''s chat template (as train does).]' \
    '--device=[Where to run; auto picks CUDA when present.]:auto|cpu|cuda\[\:N\]:_files' \
    '--dtype=[Weights'\'' dtype (default\: the base'\''s).]:DTYPE:(float32 bfloat16 float16)' \
    '--seed=[Seed of the bootstrap and of candidate draws\: same seed, same bytes.]:INT: ' \
    '(-o --out)'{-o+,--out=}'[Write the report to FILE instead of stdout.]:FILE:_files' \
    '--predictions=[Write one line per (system, example)\: prompt, answer, prediction, correct, loglik, meta.]:FILE.jsonl:_files' \
    '--table[Also print the results as a table on stderr.]' \
    '--plot=[Draw bars with intervals by system and the first --by key (needs matplotlib).]:FILE.png:_files' \
    '--fail-under=[Exit 3, after writing, when a system'\''s metric on a whole dataset is below X.]:X: ' \
    '--trust-remote-code[Allow the models'\'' own Python code (off by default).]' \
    '--combine[Pool eval reports (the arguments) of one experiment run with several seeds\: mean and 95% t interval over the reports, no model loaded.]' \
    '--claims=[Check a claim set on the report\: with --table the claim set'\''s compact table; --summary and --figures write its text and pictures.]:two-hop:_files' \
    '--summary=[With --claims\: write the table and each claim'\''s verdict, in numbers, as Markdown.]:FILE.md:_files' \
    '--figures=[With --claims\: write the claim set'\''s pictures (two-hop.png, single-hop.png) into DIR.]:DIR:_files' \
    '--force[Replace an existing output (only one lrtool wrote).]' \
    '(-q --quiet)'{-q,--quiet}'[Print nothing but data and errors.]' \
    '(-v --verbose)'{-v,--verbose}'[Log more detail to stderr.]' \
    '(-h --help)'{-h,--help}'[Show this message and exit.]' \
    '*:DATA.jsonl...:_files'
}

_lrtool_route() {
  _arguments -s -S \
    '(-o --out)'{-o+,--out=}'[The router directory (printed on stdout).]:DIR:_files' \
    '--method=[Router (see --list).]:METHOD:(arrow uniform centroid lorahub oracle)' \
    '--top-k=[arrow, centroid\: adapters mixed per token or example.]:INT: ' \
    '--temperature=[arrow, centroid\: softmax temperature (default 1).]:FLOAT: ' \
    '--mix=[arrow\: outputs (default) or factors.]:MIX:(outputs factors)' \
    '*--general=[arrow\: general adapters to subtract (GenKnowSub); repeat.]:ADAPTER:_files' \
    '*--examples=[centroid\: ADAPTER=FILE.jsonl for each adapter; lorahub\: FILE.jsonl of the task.]:ADAPTER=FILE|FILE:_files' \
    '--layer=[centroid\: hidden layer compared (default -1, the last).]:INT: ' \
    '--budget=[lorahub\: evaluations of the objective (default 40).]:INT: ' \
    '--seed=[lorahub\: seed of the search (default 0).]:INT: ' \
    '--by=[oracle\: the meta key that labels examples.]:KEY:_files' \
    '--map=[oracle\: which adapter each label goes to.]:VALUE=ADAPTER,...:_files' \
    '--base=[centroid, lorahub, --explain\: the base model directory.]:BASE:_files' \
    '--explain=[Print this router'\''s decisions on DATA.jsonl... as JSON lines.]:ROUTER:_files' \
    '--chat-template[centroid, lorahub, --explain\: format prompts with the base'\''s chat template (as train and eval do; give it where they were given it).]' \
    '--allow-base-mismatch[Route between adapters whose configs name different bases (e.g. one model under two names); their shapes must still agree.]' \
    '--batch-size=[--explain\: examples per forward pass.]:INT: ' \
    '--list[Print the routers as JSON lines (name, summary, parameters) and exit.]' \
    '--force[Replace an existing output (only one lrtool wrote).]' \
    '(-q --quiet)'{-q,--quiet}'[Print nothing but data and errors.]' \
    '(-v --verbose)'{-v,--verbose}'[Log more detail to stderr.]' \
    '(-h --help)'{-h,--help}'[Show this message and exit.]' \
    '*:ADAPTER...|DATA.jsonl...:_files'
}

_lrtool_gen_data() {
  local curcontext=$curcontext state state_descr line ret=1
  typeset -A opt_args
  _arguments -C -s -S \
    '(-h --help)'{-h,--help}'[Show this message and exit.]' \
    '1: :->command' \
    '*:: :->argument' && ret=0
  case $state in
    (command)
      local -a commands=(
        'two-hop:Two-hop knowledge: "A'\''s mentor is B", "B was born in C", and "where was A'\''s mentor born?".'
        'math:Math word problems: skill1 (cost = quantity x price), skill2 (change = paid - cost), composed (both).'
      )
      _describe -t commands 'lrtool gen-data command' commands && ret=0
      ;;
    (argument)
      curcontext=${curcontext%:*:*}:lrtool-gen-data-$words[1]:
      case $words[1] in
        (two-hop) _lrtool_gen_data_two_hop && ret=0 ;;
        (math) _lrtool_gen_data_math && ret=0 ;;
      esac
      ;;
  esac
  return ret
}

_lrtool_gen_data_two_hop() {
  _arguments -s -S \
    '--split=[Write one split as JSONL.]:SPLIT:(pretrain hop1 hop2 direct twohop)' \
    '(-o --out)'{-o+,--out=}'[With --split\: a JSONL file ('\''-'\'' = stdout, the default).]:PATH:_files' \
    '--templates=[Paraphrase set of --split\: training or held-out evaluation.]:TEMPLATES:(train eval)' \
    '--seed=[Seed of the world\: the same arguments give the same bytes.]:INT: ' \
    '--size=[Preset of every count below; flags override it.]:SIZE:(tiny small gpu)' \
    '--cities=[Birth cities (the answers).]:INT: ' \
    '--familiar-mentors=[Mentors whose birth city is in pretrain.]:INT: ' \
    '--new-mentors=[Mentors never in pretrain.]:INT: ' \
    '--familiar-people=[People whose mentor is in pretrain (bridge + R chains).]:INT: ' \
    '--h-people=[New people with a familiar mentor (H).]:INT: ' \
    '--f-people=[New people with a new mentor (F).]:INT: ' \
    '--bridge-fraction=[Share of familiar people whose two-hop statement is in pretrain.]:FLOAT: ' \
    '--filler=[Filler lines about cities in pretrain.]:INT: ' \
    '--force[Replace an existing output (only one lrtool wrote).]' \
    '(-q --quiet)'{-q,--quiet}'[Print nothing but data and errors.]' \
    '(-v --verbose)'{-v,--verbose}'[Log more detail to stderr.]' \
    '(-h --help)'{-h,--help}'[Show this message and exit.]'
}

_lrtool_gen_data_math() {
  _arguments -s -S \
    '--split=[Write one split as JSONL.]:SPLIT:(skill1 skill2 composed pretrain)' \
    '(-o --out)'{-o+,--out=}'[With --split\: a JSONL file ('\''-'\'' = stdout, the default).]:PATH:_files' \
    '--templates=[Paraphrase set of --split\: training or held-out evaluation.]:TEMPLATES:(train eval)' \
    '--seed=[Seed of the world\: the same arguments give the same bytes.]:INT: ' \
    '--size=[Preset of every count below; flags override it.]:SIZE:(tiny small gpu)' \
    '--skill-problems=[Problems in each of skill1 and skill2.]:INT: ' \
    '--composed-problems=[Problems in composed.]:INT: ' \
    '--subtraction-facts=[Distinct subtractions in pretrain (two lines each).]:INT: ' \
    '--filler-sentences=[Shopping sentences without arithmetic in pretrain.]:INT: ' \
    '--shared-template[Write both skills'\'' solutions in one template (the bridge).]' \
    '--answer-format=[number\: the answer is the final number; solution\: the worked solution, which ends with it (meta.final_answer keeps the number).]:ANSWER_FORMAT:(number solution)' \
    '--force[Replace an existing output (only one lrtool wrote).]' \
    '(-q --quiet)'{-q,--quiet}'[Print nothing but data and errors.]' \
    '(-v --verbose)'{-v,--verbose}'[Log more detail to stderr.]' \
    '(-h --help)'{-h,--help}'[Show this message and exit.]'
}

if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
  _lrtool "$@"  # autoloaded from $fpath
else
  compdef _lrtool lrtool  # sourced
fi
