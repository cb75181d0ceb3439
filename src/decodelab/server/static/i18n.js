/* decodelab playground: English and Polish strings. Elements carry data-i18n="key" (text), data-i18n-html="key"
 * (trusted markup written here), data-i18n-title / data-i18n-aria-label (attributes). DL.t(key, vars) for code. */
(function () {
  "use strict";

  const STRINGS = {
    en: {
      skip: "Skip to the prompt",
      title: "playground",
      model: "Model",
      error: "Error",
      dismiss: "dismiss",
      explain: "What is this?",
      working: "working…",
      "tokens.h": "1. Prompt and tokens",
      "prompt.label": "Prompt",
      analyse: "Tokenize and predict",
      "analyse.hint": "Updates as you type (Ctrl+Enter to run now).",
      "tokens.count": "Tokens",
      "tokens.explain":
        "<p>A model does not read letters or words: it reads <b>tokens</b>, pieces of text from a fixed vocabulary " +
        "(49,152 pieces for SmolLM2). Frequent words are one token; rare words are split into several. A leading " +
        "space is part of the token (shown here as ␣).</p><p>Each chip is one token with its <b>id</b>, the number " +
        "the model actually sees. Special tokens (dashed) mark things like the start of a text. A token can even be " +
        "part of one character: then its bytes are shown as &lt;0xNN&gt;.</p>",
      "next.h": "2. Next token",
      "next.controls": "Reshape the distribution (no new model run)",
      temperature: "Temperature",
      topk: "Top-k (0 = off)",
      topp: "Top-p",
      minp: "Min-p",
      reset: "reset",
      "next.hint": "Click a candidate (or focus it and press Enter) to append it and see what comes next.",
      undo: "Undo",
      "branches.hint": "Branches you tried:",
      "next.explain":
        "<p>For every token in its vocabulary the model outputs one number, a <b>logit</b>. <b>Softmax</b> turns " +
        "the logits into probabilities: exp(logit), divided by the sum over the vocabulary, so they add up to 100%. " +
        "The bars show the most likely next tokens.</p><p><b>Temperature</b> divides the logits before softmax: " +
        "below 1 the favourite gets even more likely, above 1 the choice gets flatter; 0 means always the " +
        "favourite. <b>Top-k</b> keeps only the k best tokens. <b>Top-p</b> (nucleus) keeps the smallest set of best " +
        "tokens whose probabilities add up to p. <b>Min-p</b> drops tokens less likely than min-p × the favourite. " +
        "Removed tokens are greyed; the others are renormalised to add up to 100% again. These settings only matter " +
        "when sampling.</p>",
      "gen.h": "3. Generate",
      strategy: "Strategy",
      greedy: "greedy",
      sampling: "sampling",
      beam: "beam search",
      max_new_tokens: "Max new tokens",
      moreSettings: "More settings (every other GenerationConfig knob)",
      seed: "Seed",
      num_beams: "Beams",
      num_return_sequences: "Returned sequences",
      length_penalty: "Length penalty",
      repetition_penalty: "Repetition penalty",
      no_repeat_ngram_size: "No-repeat n-gram size",
      generate: "Generate",
      stop: "Stop",
      "legend.prob": "Colour: probability the model gave each chosen token",
      "gen.explain":
        "<p><b>Greedy</b> decoding takes the most likely token at every step: fast and repeatable, but often dull " +
        "or repetitive. <b>Sampling</b> draws the next token at random from the (reshaped) distribution: more " +
        "varied; the same seed gives the same text.</p><p>The <b>repetition penalty</b> makes every token that " +
        "already appeared less likely (its logit is divided by the penalty when positive, multiplied when " +
        "negative). <b>No-repeat n-gram</b> forbids repeating any sequence of n tokens.</p><p>Hover over or focus " +
        "a generated token to see what else the model considered at that step.</p>",
      "tree.h": "4. Beam search tree",
      "tree.empty": "Generate with the beam search strategy to see the tree.",
      "st.kept": "kept",
      "st.pruned": "pruned",
      "st.finished": "finished",
      "st.returned": "returned",
      "tree.explain":
        "<p><b>Beam search</b> keeps several partial texts (<b>beams</b>) at once. At each step it extends every " +
        "beam by its likely next tokens and keeps only the best few by total log-probability (the sum of the " +
        "log-probabilities of their tokens). The rest are <b>pruned</b>.</p><p>A hypothesis that ends (end token " +
        "or length limit) is <b>finished</b>; its score is its total log-probability divided by its length to the " +
        "power of the length penalty. The best finished ones are <b>returned</b> (highlighted).</p>",
      "cmp.h": "5. Compare strategies",
      "cmp.columns": "Columns",
      "cmp.run": "Compare",
      "cmp.explain":
        "<p>The same prompt, decoded in two or three ways side by side. Greedy and beam search always give the same " +
        "text; sampling changes with the seed. Beam search tends to find texts the model finds more likely overall, " +
        "which is not always the most interesting text.</p>",
      footer: "Everything runs on this machine: the page talks only to the decodelab server that served it.",
      // dynamic
      special: "special token",
      bytes: "bytes",
      id: "id",
      filtered: "filtered",
      entropy: "entropy",
      nats: "nats",
      keptTokens: "{n} of {v} tokens kept",
      step: "step",
      chose: "chose",
      alternatives: "Alternatives at step {step}",
      altHint: "Hover over or focus a generated token to see its alternatives.",
      processed: "after processors",
      constraint: "Constraint",
      "constraint.none": "none",
      "constraint.json_schema": "JSON schema",
      "constraint.regex": "regular expression",
      "constraint.grammar": "grammar (Lark or GBNF)",
      "constraint.spec": "Schema, pattern or grammar",
      constraintStep: "{kind}: {n} tokens allowed · {mass} of the probability removed",
      constraintAt: "at",
      forbidden: "forbidden",
      score: "score",
      finish: "finish",
      "finish.eos": "end token",
      "finish.length": "length limit",
      "finish.stop": "stop string",
      generating: "generating…",
      doneIn: "done in {s} s",
      stopped: "stopped",
      root: "prompt",
      column: "Column {n}",
      bestSoFar: "current best beam",
      sequence: "sequence {n}",
      cumulative: "total log-prob",
      logprob: "log-prob",
      candidate: "Append {token} (probability {p})",
      nodeLabel: "{token}: step {step}, {status}, total log-prob {cum}",
      comparing: "running {i} of {n}…",
      network: "cannot reach the server ({msg})",
      "key.h": "API key",
      "key.text": "This server needs an API key: ask whoever runs it. The key is kept in this tab only, until you " +
        "close it.",
      "key.refused": "The server did not accept that key. Try again.",
      "key.label": "Key",
      "key.ok": "Use this key",
      "key.cancel": "Cancel",
    },
    pl: {
      skip: "Przejdź do tekstu",
      title: "plac zabaw",
      model: "Model",
      error: "Błąd",
      dismiss: "zamknij",
      explain: "Co to jest?",
      working: "pracuję…",
      "tokens.h": "1. Tekst i tokeny",
      "prompt.label": "Tekst początkowy (prompt)",
      analyse: "Podziel na tokeny i przewiduj",
      "analyse.hint": "Odświeża się podczas pisania (Ctrl+Enter: od razu).",
      "tokens.count": "Tokeny",
      "tokens.explain":
        "<p>Model nie czyta liter ani słów, tylko <b>tokeny</b>: kawałki tekstu ze stałego słownika (SmolLM2 ma " +
        "ich 49 152). Częste słowa są jednym tokenem, rzadkie dzielą się na kilka. Spacja na początku należy do " +
        "tokenu (tu widać ją jako ␣).</p><p>Każdy kafelek to jeden token z <b>numerem (id)</b>, czyli liczbą, którą " +
        "naprawdę widzi model. Tokeny specjalne (przerywana ramka) oznaczają np. początek tekstu. Token może być " +
        "nawet częścią jednego znaku, np. polskiej litery: wtedy pokazujemy jego bajty jako &lt;0xNN&gt;.</p>",
      "next.h": "2. Następny token",
      "next.controls": "Zmień kształt rozkładu (bez ponownego uruchamiania modelu)",
      temperature: "Temperatura",
      topk: "Top-k (0 = wył.)",
      topp: "Top-p",
      minp: "Min-p",
      reset: "przywróć",
      "next.hint": "Kliknij kandydata (albo zaznacz go i wciśnij Enter), aby go dopisać i zobaczyć, co dalej.",
      undo: "Cofnij",
      "branches.hint": "Wypróbowane gałęzie:",
      "next.explain":
        "<p>Dla każdego tokenu ze słownika model zwraca jedną liczbę: <b>logit</b>. <b>Softmax</b> zamienia logity " +
        "w prawdopodobieństwa: exp(logit) podzielone przez sumę po całym słowniku, więc razem dają 100%. Słupki " +
        "pokazują najbardziej prawdopodobne następne tokeny.</p><p><b>Temperatura</b> dzieli logity przed " +
        "softmaksem: poniżej 1 faworyt staje się jeszcze pewniejszy, powyżej 1 wybór się wyrównuje; 0 oznacza " +
        "zawsze faworyta. <b>Top-k</b> zostawia tylko k najlepszych tokenów. <b>Top-p</b> (nucleus) zostawia " +
        "najmniejszy zbiór najlepszych tokenów, których prawdopodobieństwa sumują się do p. <b>Min-p</b> odrzuca " +
        "tokeny mniej prawdopodobne niż min-p × faworyt. Odrzucone są wyszarzone, pozostałe przeskalowane tak, by " +
        "znów dawały 100%. Te ustawienia działają tylko przy losowaniu.</p>",
      "gen.h": "3. Generowanie",
      strategy: "Strategia",
      greedy: "zachłanna",
      sampling: "losowanie",
      beam: "przeszukiwanie wiązkowe",
      max_new_tokens: "Maks. nowych tokenów",
      moreSettings: "Więcej ustawień (pozostałe parametry GenerationConfig)",
      seed: "Ziarno losowania",
      num_beams: "Liczba wiązek",
      num_return_sequences: "Zwracane sekwencje",
      length_penalty: "Kara za długość",
      repetition_penalty: "Kara za powtórzenia",
      no_repeat_ngram_size: "Zakaz powtórzeń n-gramów (n)",
      generate: "Generuj",
      stop: "Zatrzymaj",
      "legend.prob": "Kolor: prawdopodobieństwo, jakie model dał każdemu wybranemu tokenowi",
      "gen.explain":
        "<p>Dekodowanie <b>zachłanne</b> bierze w każdym kroku najbardziej prawdopodobny token: szybko i " +
        "powtarzalnie, ale często nudno albo w kółko to samo. <b>Losowanie</b> wybiera następny token losowo z " +
        "(zmienionego) rozkładu: tekst jest bardziej urozmaicony; to samo ziarno daje ten sam tekst.</p><p><b>Kara " +
        "za powtórzenia</b> obniża szansę każdego tokenu, który już wystąpił (jego logit dzielimy przez karę, gdy " +
        "jest dodatni, a mnożymy, gdy ujemny). <b>Zakaz powtórzeń n-gramów</b> nie pozwala powtórzyć żadnego ciągu " +
        "n tokenów.</p><p>Najedź na wygenerowany token albo go zaznacz, aby zobaczyć, co jeszcze model brał pod " +
        "uwagę w tym kroku.</p>",
      "tree.h": "4. Drzewo przeszukiwania wiązkowego",
      "tree.empty": "Wygeneruj tekst strategią „przeszukiwanie wiązkowe”, aby zobaczyć drzewo.",
      "st.kept": "zachowana",
      "st.pruned": "odcięta",
      "st.finished": "zakończona",
      "st.returned": "zwrócona",
      "tree.explain":
        "<p><b>Przeszukiwanie wiązkowe</b> (beam search) śledzi naraz kilka początków tekstu, zwanych " +
        "<b>wiązkami</b>. W każdym kroku przedłuża każdą wiązkę o jej prawdopodobne następne tokeny i zostawia tylko " +
        "kilka najlepszych według łącznego logarytmu prawdopodobieństwa (sumy logarytmów prawdopodobieństw ich " +
        "tokenów). Reszta zostaje <b>odcięta</b>.</p><p>Hipoteza, która się kończy (token końca albo limit " +
        "długości), jest <b>zakończona</b>; jej wynik to łączny logarytm prawdopodobieństwa podzielony przez długość " +
        "do potęgi kary za długość. Najlepsze zakończone są <b>zwracane</b> (wyróżnione).</p>",
      "cmp.h": "5. Porównanie strategii",
      "cmp.columns": "Kolumny",
      "cmp.run": "Porównaj",
      "cmp.explain":
        "<p>Ten sam tekst początkowy dekodowany na dwa lub trzy sposoby obok siebie. Strategia zachłanna i wiązkowa " +
        "zawsze dają ten sam wynik; losowanie zmienia się z ziarnem. Przeszukiwanie wiązkowe zwykle znajduje " +
        "teksty, które model uważa za bardziej prawdopodobne jako całość, co nie zawsze znaczy ciekawsze.</p>",
      footer: "Wszystko działa na tym komputerze: strona rozmawia tylko z serwerem decodelab, który ją wysłał.",
      special: "token specjalny",
      bytes: "bajty",
      id: "id",
      filtered: "odrzucony",
      entropy: "entropia",
      nats: "natów",
      keptTokens: "zostaje {n} z {v} tokenów",
      step: "krok",
      chose: "wybrano",
      alternatives: "Alternatywy w kroku {step}",
      altHint: "Najedź na wygenerowany token albo go zaznacz, aby zobaczyć alternatywy.",
      processed: "po procesorach",
      constraint: "Ograniczenie",
      "constraint.none": "brak",
      "constraint.json_schema": "schemat JSON",
      "constraint.regex": "wyrażenie regularne",
      "constraint.grammar": "gramatyka (Lark lub GBNF)",
      "constraint.spec": "Schemat, wzorzec albo gramatyka",
      constraintStep: "{kind}: dozwolonych tokenów: {n} · usunięto {mass} prawdopodobieństwa",
      constraintAt: "w miejscu",
      forbidden: "zabroniony",
      score: "wynik",
      finish: "koniec",
      "finish.eos": "token końca",
      "finish.length": "limit długości",
      "finish.stop": "ciąg stopu",
      generating: "generuję…",
      doneIn: "gotowe w {s} s",
      stopped: "zatrzymano",
      root: "początek",
      column: "Kolumna {n}",
      bestSoFar: "obecnie najlepsza wiązka",
      sequence: "sekwencja {n}",
      cumulative: "łączny log-prawd.",
      logprob: "log-prawd.",
      candidate: "Dopisz {token} (prawdopodobieństwo {p})",
      nodeLabel: "{token}: krok {step}, {status}, łączny log-prawd. {cum}",
      comparing: "uruchamiam {i} z {n}…",
      network: "brak połączenia z serwerem ({msg})",
      "key.h": "Klucz API",
      "key.text": "Ten serwer wymaga klucza API: zapytaj osobę, która go uruchomiła. Klucz jest przechowywany tylko w " +
        "tej karcie, do jej zamknięcia.",
      "key.refused": "Serwer nie przyjął tego klucza. Spróbuj ponownie.",
      "key.label": "Klucz",
      "key.ok": "Użyj tego klucza",
      "key.cancel": "Anuluj",
    },
  };

  let lang = "en";

  function t(key, vars) {
    let s = (STRINGS[lang] && STRINGS[lang][key]) || STRINGS.en[key] || key;
    if (vars) for (const k of Object.keys(vars)) s = s.split("{" + k + "}").join(String(vars[k]));
    return s;
  }

  function apply(root) {
    const scope = root || document;
    scope.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
    scope.querySelectorAll("[data-i18n-html]").forEach((el) => { el.innerHTML = t(el.dataset.i18nHtml); });
    scope.querySelectorAll("[data-i18n-title]").forEach((el) => { el.title = t(el.dataset.i18nTitle); });
    scope.querySelectorAll("[data-i18n-aria-label]").forEach((el) => {
      el.setAttribute("aria-label", t(el.dataset.i18nAriaLabel));
    });
  }

  function setLang(code) {
    lang = STRINGS[code] ? code : "en";
    document.documentElement.lang = lang;
    try { localStorage.setItem("decodelab.lang", lang); } catch (e) { /* private mode */ }
    apply();
  }

  function initialLang() {
    try {
      const saved = localStorage.getItem("decodelab.lang");
      if (saved && STRINGS[saved]) return saved;
    } catch (e) { /* ignore */ }
    return (navigator.language || "en").toLowerCase().startsWith("pl") ? "pl" : "en";
  }

  window.DL = window.DL || {};
  const num = (x) => Number(x).toLocaleString(lang === "pl" ? "pl-PL" : "en-US");
  Object.assign(window.DL, { t, num, setLang, applyI18n: apply, lang: () => lang, initialLang, STRINGS });
})();
