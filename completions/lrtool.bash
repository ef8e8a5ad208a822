# bash completion for lrtool, generated from lrtool/cli.py by `python -m lrtool.docs` (make docs): do not edit.
# Use: source it from ~/.bashrc, or copy it to ~/.local/share/bash-completion/completions/lrtool.

_lrtool_subcommands() {  # subcommands of a group, by its words after lrtool
    case $1 in
        '') REPLY='train merge diagnose eval route gen-data' ;;
        'gen-data') REPLY='two-hop math' ;;
        *) REPLY='' ;;
    esac
}

_lrtool_options() {  # every option spelling of a command
    case $1 in
        '') REPLY='-q --quiet -v --verbose --debug --version -h --help' ;;
        'train') REPLY='--base -o --out --full -r --rank --alpha --rslora --dropout --targets --init --train-tokens --vocab-from --lr --weight-decay --epochs --max-steps --batch-size --grad-accum --warmup --schedule --loss --chat-template --until-accuracy --check-every --check-sample --seed --device --dtype --max-length --log-every --resume --trust-remote-code --force -q --quiet -v --verbose -h --help' ;;
        'merge') REPLY='-o --out --method --weights -r --rank --density --seed --epsilon --lambda --gamma --t --into-base --allow-base-mismatch --format --list --force -q --quiet -v --verbose -h --help' ;;
        'diagnose') REPLY='--base --fail-on --table --exact-sign-conflicts --plot --force -q --quiet -v --verbose -h --help' ;;
        'eval') REPLY='--base --system --adapter --model --score --choices --max-choices --by --bootstrap --reference --limit --batch-size --max-new-tokens --chat-template --device --dtype --seed -o --out --predictions --table --plot --fail-under --trust-remote-code --combine --claims --summary --figures --force -q --quiet -v --verbose -h --help' ;;
        'route') REPLY='-o --out --method --top-k --temperature --mix --general --examples --layer --budget --seed --by --map --base --explain --chat-template --allow-base-mismatch --batch-size --list --force -q --quiet -v --verbose -h --help' ;;
        'gen-data') REPLY='-h --help' ;;
        'gen-data two-hop') REPLY='--split -o --out --templates --seed --size --cities --familiar-mentors --new-mentors --familiar-people --h-people --f-people --bridge-fraction --filler --force -q --quiet -v --verbose -h --help' ;;
        'gen-data math') REPLY='--split -o --out --templates --seed --size --skill-problems --composed-problems --subtraction-facts --filler-sentences --shared-template --answer-format --force -q --quiet -v --verbose -h --help' ;;
        *) REPLY='' ;;
    esac
}

_lrtool_value_options() {  # the options that take a value
    case $1 in
        '') REPLY='' ;;
        'train') REPLY='--base -o --out -r --rank --alpha --dropout --targets --init --train-tokens --vocab-from --lr --weight-decay --epochs --max-steps --batch-size --grad-accum --warmup --schedule --loss --until-accuracy --check-every --check-sample --seed --device --dtype --max-length --log-every' ;;
        'merge') REPLY='-o --out --method --weights -r --rank --density --seed --epsilon --lambda --gamma --t --into-base --format' ;;
        'diagnose') REPLY='--base --fail-on --plot' ;;
        'eval') REPLY='--base --system --adapter --model --score --choices --max-choices --by --bootstrap --reference --limit --batch-size --max-new-tokens --device --dtype --seed -o --out --predictions --plot --fail-under --claims --summary --figures' ;;
        'route') REPLY='-o --out --method --top-k --temperature --mix --general --examples --layer --budget --seed --by --map --base --explain --batch-size' ;;
        'gen-data') REPLY='' ;;
        'gen-data two-hop') REPLY='--split -o --out --templates --seed --size --cities --familiar-mentors --new-mentors --familiar-people --h-people --f-people --bridge-fraction --filler' ;;
        'gen-data math') REPLY='--split -o --out --templates --seed --size --skill-problems --composed-problems --subtraction-facts --filler-sentences --answer-format' ;;
        *) REPLY='' ;;
    esac
}

_lrtool_choices() {  # the values an option takes, by 'command|option'
    case $1 in
        'train|--init') REPLY='default gaussian' ;;
        'train|--schedule') REPLY='cosine constant' ;;
        'train|--loss') REPLY='answer all' ;;
        'train|--dtype') REPLY='float32 bfloat16 float16' ;;
        'merge|--method') REPLY='linear svd factor-avg ties dare-linear dare-ties magnitude-prune knots task-arithmetic della della-linear breadcrumbs breadcrumbs-ties sce slerp karcher tsv iso-c iso-cts core-space' ;;
        'merge|--format') REPLY='peft kohya diffusers mlx' ;;
        'diagnose|--fail-on') REPLY='error warning' ;;
        'eval|--dtype') REPLY='float32 bfloat16 float16' ;;
        'route|--method') REPLY='arrow uniform centroid lorahub oracle' ;;
        'route|--mix') REPLY='outputs factors' ;;
        'gen-data two-hop|--split') REPLY='pretrain hop1 hop2 direct twohop' ;;
        'gen-data two-hop|--templates') REPLY='train eval' ;;
        'gen-data two-hop|--size') REPLY='tiny small gpu' ;;
        'gen-data math|--split') REPLY='skill1 skill2 composed pretrain' ;;
        'gen-data math|--templates') REPLY='train eval' ;;
        'gen-data math|--size') REPLY='tiny small gpu' ;;
        'gen-data math|--answer-format') REPLY='number solution' ;;
        *) REPLY='' ;;
    esac
}

_lrtool() {
    local REPLY word path='' opt='' prefix='' i=1 cur=${COMP_WORDS[COMP_CWORD]}
    COMPREPLY=()
    # Follow the words before the cursor: descend into subcommands, step over option values.
    while ((i < COMP_CWORD)); do
        word=${COMP_WORDS[i]}
        if [[ $word == -- ]]; then
            return 0  # only arguments follow: file names (-o default)
        elif [[ $word == -* ]]; then
            _lrtool_value_options "$path"
            if [[ " $REPLY " == *" $word "* ]]; then
                ((i++))
                [[ ${COMP_WORDS[i]} == = ]] && ((i++))  # --opt=VALUE, split at '=' by COMP_WORDBREAKS
            fi
        else
            _lrtool_subcommands "$path"
            [[ " $REPLY " == *" $word "* ]] && path=${path:+$path }$word
        fi
        ((i++))
    done
    # The word at the cursor may be an option's value: --opt VALUE, or --opt=VALUE whether or not
    # COMP_WORDBREAKS splits words at '='.
    if [[ $cur == = ]] && ((COMP_CWORD >= 2)); then
        opt=${COMP_WORDS[COMP_CWORD-1]} cur=''
    elif [[ ${COMP_WORDS[COMP_CWORD-1]} == = ]] && ((COMP_CWORD >= 3)); then
        opt=${COMP_WORDS[COMP_CWORD-2]}
    elif [[ $cur == -*=* ]]; then
        opt=${cur%%=*} prefix=${cur%%=*}= cur=${cur#*=}
    elif ((COMP_CWORD >= 1)); then
        opt=${COMP_WORDS[COMP_CWORD-1]}
    fi
    _lrtool_value_options "$path"
    if [[ $opt == -* && " $REPLY " == *" $opt "* ]]; then
        _lrtool_choices "$path|$opt"
        [[ -n $REPLY ]] && COMPREPLY=($(compgen -P "$prefix" -W "$REPLY" -- "$cur"))
        return 0  # no choices: file names (-o default)
    fi
    if [[ $cur == -* ]]; then
        _lrtool_options "$path"
    else
        _lrtool_subcommands "$path"
    fi
    [[ -n $REPLY ]] && COMPREPLY=($(compgen -W "$REPLY" -- "$cur"))
    return 0
}

complete -F _lrtool -o default lrtool
