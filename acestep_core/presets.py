"""The official app's genre presets (acestep/ui/components.py, GENRE_PRESETS): a name -> the tags it fills in.

"Custom" keeps the user's own tags (the app's dropdown starts on it).
"""
from __future__ import annotations

CUSTOM = "Custom"
GENRE_PRESETS: dict[str, str] = {
    "Modern Pop": "pop, synth, drums, guitar, 120 bpm, upbeat, catchy, vibrant, female vocals, polished vocals",
    "Rock": "rock, electric guitar, drums, bass, 130 bpm, energetic, rebellious, gritty, male vocals, raw vocals",
    "Hip Hop": "hip hop, 808 bass, hi-hats, synth, 90 bpm, bold, urban, intense, male vocals, rhythmic vocals",
    "Country": "country, acoustic guitar, steel guitar, fiddle, 100 bpm, heartfelt, rustic, warm, male vocals, "
               "twangy vocals",
    "EDM": "edm, synth, bass, kick drum, 128 bpm, euphoric, pulsating, energetic, instrumental",
    "Reggae": "reggae, guitar, bass, drums, 80 bpm, chill, soulful, positive, male vocals, smooth vocals",
    "Classical": "classical, orchestral, strings, piano, 60 bpm, elegant, emotive, timeless, instrumental",
    "Jazz": "jazz, saxophone, piano, double bass, 110 bpm, smooth, improvisational, soulful, male vocals, "
            "crooning vocals",
    "Metal": "metal, electric guitar, double kick drum, bass, 160 bpm, aggressive, intense, heavy, male vocals, "
             "screamed vocals",
    "R&B": "r&b, synth, bass, drums, 85 bpm, sultry, groovy, romantic, female vocals, silky vocals",
}
PRESET_NAMES = (CUSTOM, *GENRE_PRESETS)


def preset_tags(preset: str, tags: str) -> str:
    """The tags a preset stands for; ``Custom`` returns `tags` unchanged."""
    if preset == CUSTOM:
        return tags
    if preset not in GENRE_PRESETS:
        raise ValueError(f"preset must be one of {PRESET_NAMES}, got {preset!r:.200}")
    return GENRE_PRESETS[preset]
