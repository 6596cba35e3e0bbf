"""Learning BPE merges from a corpus, with the pair counts kept up to date after each merge.

The corpus arrives as its distinct pre-tokens ("words", see bpe.py) with how
often each occurs: a corpus of a million words may have only tens of thousands
of distinct ones, and a word that occurs 500 times is merged once and counted
500 times. A word is a list of token ids; it starts as its bytes (ids 0..255).

Every step merges the most frequent adjacent pair (a, b) into a new token, where

    count(a, b) = sum over words of  (times a is followed by b in the word) * (the word's count)

The simple way recounts every pair of every word after each merge: the whole
corpus, once per merge. But a merge of (a, b) changes only the words that
contain (a, b), so this trainer keeps

    pair_counts[pair]   count(pair), for every pair present in some word
    pair_words[pair]    the indices of the words that contain the pair

and, for each word that contained (a, b), subtracts the counts of the word's
old pairs and adds those of its new pairs. The most frequent pair comes from a
heap of (-count, pair) entries. A change of count pushes a new entry rather than
searching the heap for the old one; an entry whose count is no longer the
pair's current count is stale and skipped when it is popped ("lazy deletion").

Ties: among pairs with the same count the smallest (left id, right id) wins, so
training is deterministic. test_tokenizer_bpe.py checks that this gives the
same merges as recounting everything after every merge.
"""

import heapq
from collections import Counter, defaultdict


def merge_pair(ids, pair, new_id):
    """`ids` with each occurrence of `pair`, scanning left to right, replaced by `new_id`."""
    merged = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def pairs_of(word):
    """The adjacent pairs of a word, with repeats: [1, 1, 1] has (1, 1) twice."""
    return list(zip(word, word[1:]))


def learn_merges(word_counts, n_new_tokens):
    """Learn merges from {word bytes: count} until `n_new_tokens` tokens were added, or no pair is left.

    Returns (vocab, merges): vocab is {token bytes: id}, the 256 single bytes
    as ids 0..255 and every new token after them in the order learned; merges
    is [(left bytes, right bytes)] in the order learned (its rank order). A
    merge whose result already is a token (the same bytes reached by another
    split, "a" + "bc" after "ab" + "c") reuses that token's id rather than
    adding a duplicate, so there may be more merges than new tokens.
    """
    tokens = [bytes([b]) for b in range(256)]  # id -> the token's bytes
    token_ids = {token: i for i, token in enumerate(tokens)}
    words = [list(word) for word in word_counts]  # list(bytes) is the byte values, the ids of the byte tokens
    counts = list(word_counts.values())

    pair_counts = defaultdict(int)
    pair_words = defaultdict(set)
    for w, word in enumerate(words):
        for pair in pairs_of(word):
            pair_counts[pair] += counts[w]
            pair_words[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    while len(tokens) < 256 + n_new_tokens and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -negative_count:
            continue  # stale: the pair's count changed (or it was merged) after this entry was pushed
        merged_bytes = tokens[pair[0]] + tokens[pair[1]]
        new_id = token_ids.get(merged_bytes)
        if new_id is None:
            new_id = len(tokens)
            tokens.append(merged_bytes)
            token_ids[merged_bytes] = new_id
        merges.append((tokens[pair[0]], tokens[pair[1]]))

        # Net change of every pair's count over all the words this merge rewrites.
        changes = Counter()
        for w in list(pair_words[pair]):  # a copy: the loop removes w from pair_words[pair]
            old_pairs, words[w] = pairs_of(words[w]), merge_pair(words[w], pair, new_id)
            new_pairs = pairs_of(words[w])
            for p in old_pairs:
                changes[p] -= counts[w]
            for p in new_pairs:
                changes[p] += counts[w]
            for p in set(old_pairs) - set(new_pairs):  # so later merges visit only words that have their pair
                pair_words[p].discard(w)
            for p in new_pairs:
                pair_words[p].add(w)

        for p, change in changes.items():
            if change == 0:
                continue
            pair_counts[p] += change
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:  # the pair occurs nowhere any more (always so for the merged pair itself)
                del pair_counts[p], pair_words[p]
    return token_ids, merges
